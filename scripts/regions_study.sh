#!/usr/bin/env bash
# Regions as a variable (docs/paper-questions.md): the scaling study's 800 training scenes and
# its 1,000 held-out scenes extracted again by the same detector with exactly R regions per
# image (REGIONS.MIN_REGIONS = MAX_REGIONS = R, BUTD's fixed setting: with the bundled
# thresholds most scenes keep only the minimum), then CPFEAN (demo recipe) and the SCAN-style
# baseline trained on each. Every step skips what is done: run it again to resume. Then:
# python -m pipelines.scaling_report --study runs/regions --by regions
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STUDY=${STUDY:-runs/regions}
SCALING=${SCALING:-runs/scaling}  # where scripts/scaling_study.sh generated the scenes
TRAINSET=${TRAINSET:-n800}  # which of its training sets
DET=${DET:-runs/demo/detector}
COUNTS=${COUNTS:-"10 20 36 50 100"}
ROWS=${ROWS:-"full scan"}
read -r -a EXTRA <<< "${EXTRA:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TIME=(/usr/bin/time -f '{"wall_s": %e, "peak_rss_kb": %M}')
# Every step waits while STUDY/HOLD exists, so a timing elsewhere can have the machine quiet.
hold() { while [ -f "$STUDY/HOLD" ]; do sleep 5; done; }

for need in "$DET/model_final.pth" "$SCALING/$TRAINSET/data/captions.json" "$SCALING/heldout/data/captions.json"; do
  if [ ! -f "$need" ]; then
    echo "error: $need not found (make demo, then scripts/scaling_study.sh, make them)" >&2
    exit 2
  fi
done

extract() {  # SCENES OUT R: extract once, timed (resumes)
  local scenes=$1 out=$2 r=$3 status=0
  if [ ! -f "$out/COMPLETE" ]; then
    hold
    mkdir -p "$(dirname "$out")"
    "${TIME[@]}" -o "$out.time.json" "$PY" -m pipelines.extract "$scenes/data/images" \
      --out "$out" --config "$DET/config.yaml" --weights "$DET/model_final.pth" --no-progress \
      "REGIONS.MAX_REGIONS=$r" "REGIONS.MIN_REGIONS=$r" > "$out.summary.json" || status=$?
    [ "$status" -eq 0 ] || [ "$status" -eq 3 ] || exit "$status"  # 3: some images skipped
    touch "$out/COMPLETE"
  fi
}

for r in $COUNTS; do
  extract "$SCALING/$TRAINSET" "$STUDY/r$r/regions" "$r"
  extract "$SCALING/heldout" "$STUDY/r$r/heldout" "$r"
  mkdir -p "$STUDY/r$r/s0"
  for row in $ROWS; do
    [ -f "$STUDY/r$r/s0/$row/heldout_metrics.json" ] && continue
    hold
    echo "[regions] R=$r: $row"
    "${TIME[@]}" -o "$STUDY/r$r/s0/$row.time.json" \
      "$PY" -m pipelines.ablate --config configs/demo.yaml --rows "$row" --out "$STUDY/r$r/s0" \
      --quiet --heldout-regions "$STUDY/r$r/heldout" \
      --heldout-captions "$SCALING/heldout/data/captions.json" \
      "data.regions=$STUDY/r$r/regions" "data.captions=$SCALING/$TRAINSET/data/captions.json" \
      "data.val_limit=100" "train.seed=0" "${EXTRA[@]}"
  done
done
"$PY" -m pipelines.scaling_report --study "$STUDY" --by regions
