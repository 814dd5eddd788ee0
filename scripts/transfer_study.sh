#!/usr/bin/env bash
# Another data set (docs/paper-questions.md): the photo set (drawings of real things on crops of
# real photographs, captions written from its annotations) extracted by the scenes' detector,
# the scaling study's 800-scene models scored on its test images, and CPFEAN and the SCAN-style
# baseline trained on its train images and scored on its test images and on the 1,000 held-out
# scenes. Every step skips what is done: run it again to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/photos}
SCALING=${SCALING:-runs/scaling}  # scripts/scaling_study.sh's scenes and 800-scene models
TRAINSET=${TRAINSET:-n800}  # which of its training sets' models
DET=${DET:-runs/demo/detector}
TRAIN=${TRAIN:-1000}  # photo-set train images (a tenth become val); its val split is the test
TEST=${TEST:-250}
ROWS=${ROWS:-full,scan}
read -r -a EXTRA <<< "${EXTRA:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

for need in "$DET/model_final.pth" "$SCALING/heldout/regions/COMPLETE"; do
  if [ ! -e "$need" ]; then
    echo "error: $need not found (make demo, then scripts/scaling_study.sh, make them)" >&2
    exit 2
  fi
done
[ -f "$OUT/data/captions.json" ] || "$PY" -m pipelines.make_photo_set "$OUT/data" --train "$TRAIN" --val "$TEST"
if [ ! -f "$OUT/regions/COMPLETE" ]; then
  status=0
  "$PY" -m pipelines.extract "$OUT/data/images" --out "$OUT/regions" --no-progress \
    --config "$DET/config.yaml" --weights "$DET/model_final.pth" || status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 3 ] || exit "$status"  # 3: some images skipped
  touch "$OUT/regions/COMPLETE"
fi
# scenes -> photos: the 800-scene models on the photo test images
for row in ${ROWS//,/ }; do
  ckpt="$SCALING/$TRAINSET/s0/$row/best.pt"
  [ -f "$OUT/scenes_to_photos_$row.json" ] || [ ! -f "$ckpt" ] || "$PY" -m pipelines.evaluate \
    --checkpoint "$ckpt" --regions "$OUT/regions" --captions "$OUT/data/captions.json" \
    --split test --json "$OUT/scenes_to_photos_$row.json"
done
# photos -> scenes (and photos -> photos): trained on the photo set, held out: the scenes
"$PY" -m pipelines.ablate --config configs/demo.yaml --rows "$ROWS" --out "$OUT/s0" --quiet \
  --heldout-regions "$SCALING/heldout/regions" --heldout-captions "$SCALING/heldout/data/captions.json" \
  "data.regions=$OUT/regions" "data.captions=$OUT/data/captions.json" "data.val_limit=100" \
  "train.seed=0" "${EXTRA[@]}"
