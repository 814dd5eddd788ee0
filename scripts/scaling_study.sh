#!/usr/bin/env bash
# The data-scaling study (docs/scaling.md). Training sets of SIZES training scenes (each its own
# generator seed), one held-out set of 1,000 new scenes (seed 99, which no training set uses),
# all extracted with one detector (DET, the demo's); the rows of pipelines.ablate (ROWS) on
# each, with one matcher seed below 3,200 scenes and two from 3,200 up. Then, at the largest
# size, matcher seed 0 (LARGEST_SEEDS): each paper component off (OFF_ROWS) and, if the region
# Transformer still trails CPFEAN there, the variants of its layer (pipelines.ablate's
# TRANSFORMER_VARIANTS). Every step skips what is already done (a row with best.pt and its
# scores is not trained again): run it again to resume.
# Then: python -m pipelines.scaling_report --study $STUDY --png docs/images/scaling.png
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STUDY=${STUDY:-runs/scaling}
DET=${DET:-runs/demo/detector}
SIZES=${SIZES:-"800 1600 3200 6400"}
ROWS=${ROWS:-full,transformer,prominence_loss,scan}
HELDOUT=${HELDOUT:-1000}  # held-out scenes
OFF_ROWS=${OFF_ROWS:-no_fusion,no_prominence,no_label_prior,no_spatial,no_gcn,all_regions}
LARGEST_SEEDS=${LARGEST_SEEDS:-0}
# config overrides for every row (a smoke run: EXTRA="train.epochs=1")
read -r -a EXTRA <<< "${EXTRA:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ ! -f "$DET/model_final.pth" ] || [ ! -f "$DET/config.yaml" ]; then
  echo "error: no trained detector in $DET (make demo trains one; DET=FOLDER names another)" >&2
  exit 2
fi

scenes() {  # OUT IMAGES SEED: generate once, extract with the study's detector (resumes)
  local out=$1 images=$2 seed=$3 status=0
  if [ ! -f "$out/data/captions.json" ]; then
    "$PY" -m pipelines.make_demo_data "$out/data" --images "$images" --seed "$seed" --quiet
  fi
  if [ ! -f "$out/regions/COMPLETE" ]; then
    "$PY" -m pipelines.extract "$out/data/images" --out "$out/regions" \
      --config "$DET/config.yaml" --weights "$DET/model_final.pth" || status=$?
    [ "$status" -eq 0 ] || [ "$status" -eq 3 ] || exit "$status"  # 3: some images skipped
    touch "$out/regions/COMPLETE"
  fi
}

scenes "$STUDY/heldout" "$HELDOUT" 99
rows() {  # N SEED ROWS: train and score those rows on N training scenes
  echo "[scaling] $1 training scenes, matcher seed $2: rows $3"
  "$PY" -m pipelines.ablate --config configs/demo.yaml --rows "$3" --out "$STUDY/n$1/s$2" \
    --quiet --heldout-regions "$STUDY/heldout/regions" \
    --heldout-captions "$STUDY/heldout/data/captions.json" \
    "data.regions=$STUDY/n$1/regions" "data.captions=$STUDY/n$1/data/captions.json" \
    "data.val_limit=100" "train.seed=$2" "${EXTRA[@]}"
}

largest=0
for n in $SIZES; do
  # the generator splits 80/10/10: n training scenes need n * 5/4 images
  scenes "$STUDY/n$n" $(( n * 5 / 4 )) $(( 1000 + n ))
  seeds="0"
  [ "$n" -ge 3200 ] && seeds="0 1"
  for s in $seeds; do
    rows "$n" "$s" "$ROWS"
  done
  if [ "$n" -gt "$largest" ]; then largest=$n; fi
done

for s in $LARGEST_SEEDS; do
  if [ -n "$OFF_ROWS" ]; then rows "$largest" "$s" "$OFF_ROWS"; fi
  # the variants answer why the layer hurts: only asked while it does
  held="$STUDY/n$largest/s$s/%s/heldout_metrics.json"
  trails=$("$PY" -c "import json, sys
r = [json.load(open(sys.argv[1] % row))['rsum'] for row in ('transformer', 'full')]
print(int(r[0] < r[1]))" "$held" 2>/dev/null || echo 0)
  if [ "$trails" = 1 ]; then
    variants=$("$PY" -c "from pipelines.ablate import TRANSFORMER_VARIANTS as v; print(','.join(v))")
    rows "$largest" "$s" "$variants"
  else
    echo "[scaling] $largest scenes, seed $s: the region Transformer does not trail CPFEAN" \
      "(or was not trained); its variants are not run"
  fi
done
"$PY" -m pipelines.scaling_report --study "$STUDY"
