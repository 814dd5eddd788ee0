#!/usr/bin/env bash
# The data-scaling study (docs/scaling.md). Training sets of SIZES training scenes (each its own
# generator seed), one held-out set of 1,000 new scenes (seed 99, which no training set uses),
# all extracted with one detector (DET, the demo's); the rows of pipelines.ablate (ROWS) on
# each, with one matcher seed below 3,200 scenes and two from 3,200 up. Then, at the largest
# size, matcher seed 0 (LARGEST_SEEDS): each paper component off (OFF_ROWS) and, if the region
# Transformer still trails CPFEAN there, the variants of its layer (pipelines.ablate's
# TRANSFORMER_VARIANTS). Every step skips what is already done (a row with best.pt and its
# scores is not trained again): run it again to resume. Each finished row is also kept as a
# small record in RECORD (committed: the figures outlive runs/), and a recorded row is not
# trained again either; records of sets extracted with another detector are an error.
# Then: python -m pipelines.scaling_report --study $STUDY --record $RECORD --png docs/images/scaling.png
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
# the study's records; another recipe (EXTRA) must name its own, or it would mix with these
if [ -n "${EXTRA:-}" ] && [ -z "${RECORD:-}" ]; then
  echo "error: EXTRA changes the rows' recipe: name a RECORD folder for its records" \
    "(docs/scaling holds the study's)" >&2
  exit 2
fi
RECORD=${RECORD:-docs/scaling}
# config overrides for every row (a smoke run: EXTRA="train.epochs=1" RECORD=runs/smoke-rec)
read -r -a EXTRA <<< "${EXTRA:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ ! -f "$DET/model_final.pth" ] || [ ! -f "$DET/config.yaml" ]; then
  echo "error: no trained detector in $DET (make demo trains one; DET=FOLDER names another)" >&2
  exit 2
fi
# the detector by its weights' digest: a study is one detector's sets
DIGEST=$(sha256sum "$DET/model_final.pth" | cut -c1-16)
report() { "$PY" -m pipelines.scaling_report --study "$STUDY" --record "$RECORD" --detector "$DIGEST" "$@"; }
mkdir -p "$STUDY"
report > /dev/null  # checks the records' detector before any work

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

rows() {  # N SEED ROWS: train and score those rows on N training scenes, unless recorded
  local todo=() row
  for row in ${3//,/ }; do
    [ -f "$RECORD/n$1_s$2_$row.json" ] || todo+=("$row")
  done
  if [ ${#todo[@]} -eq 0 ]; then
    echo "[scaling] $1 training scenes, matcher seed $2: rows $3 recorded"
    return
  fi
  echo "[scaling] $1 training scenes, matcher seed $2: rows $(IFS=,; echo "${todo[*]}")"
  scenes "$STUDY/heldout" "$HELDOUT" 99
  # the generator splits 80/10/10: N training scenes need N * 5/4 images
  scenes "$STUDY/n$1" $(( $1 * 5 / 4 )) $(( 1000 + $1 ))
  "$PY" -m pipelines.ablate --config configs/demo.yaml --rows "$(IFS=,; echo "${todo[*]}")" \
    --out "$STUDY/n$1/s$2" --quiet --heldout-regions "$STUDY/heldout/regions" \
    --heldout-captions "$STUDY/heldout/data/captions.json" \
    "data.regions=$STUDY/n$1/regions" "data.captions=$STUDY/n$1/data/captions.json" \
    "data.val_limit=100" "train.seed=$2" "${EXTRA[@]}"
  report > /dev/null
}

largest=0
for n in $SIZES; do
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
  held="$RECORD/n${largest}_s${s}_%s.json"
  trails=$("$PY" -c "import json, sys
r = [json.load(open(sys.argv[1] % row))['heldout']['rsum'] for row in ('transformer', 'full')]
print(int(r[0] < r[1]))" "$held" 2>/dev/null || echo 0)
  if [ "$trails" = 1 ]; then
    variants=$("$PY" -c "from cpfean.studies import TRANSFORMER_VARIANTS as v; print(','.join(v))")
    rows "$largest" "$s" "$variants"
  else
    echo "[scaling] $largest scenes, seed $s: the region Transformer does not trail CPFEAN" \
      "(or was not trained); its variants are not run"
  fi
done
report
