#!/usr/bin/env bash
# make gpu-check: every device path on one command. First the tests marked `gpu` (on CUDA
# when there is one, else the same code on the CPU: the CPU half). Then, with CUDA only: the
# quick demo on the GPU end to end, and the score, extract, train and serve benchmarks on it,
# their figures gathered into one JSON ($GPU_CHECK_OUT/gpu-check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
# DEVICE=cpu with GPU_CHECK_FORCE=1 runs the device half on the CPU: a check of this script itself
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
step() { echo "[gpu-check] $1 ($(( $(date +%s) - start )) s)"; }

step "tests marked gpu"
"$PY" -m pytest -q -p no:cacheprovider -m gpu
if [ "${GPU_CHECK_FORCE:-0}" != 1 ] \
  && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device on this machine: ran the CPU half only (tests marked gpu)"
  exit 0
fi
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -c "import torch; print('[gpu-check]', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA', 'torch', torch.__version__)"
step "quick demo on $DEVICE"
"$PY" -m pipelines.demo --quick --device "$DEVICE" --out "$OUT/demo"
step "benchmark score"
"$PY" -m pipelines.benchmark score --device "$DEVICE" --json "$OUT/score.json"
step "benchmark extract"
"$PY" -m pipelines.benchmark extract --device "$DEVICE" --num 64 --json "$OUT/extract.json"
step "benchmark train"
"$PY" -m pipelines.benchmark train --device "$DEVICE" --store "$OUT/demo/regions" \
  --captions "$OUT/demo/data/captions.json" --workdir "$OUT" --json "$OUT/train.json" \
  train.batch_size=32
step "benchmark serve"
"$PY" -m pipelines.benchmark serve --device "$DEVICE" --index "$OUT/demo/index" --requests 50 \
  --clients 4 --per-client 10 --json "$OUT/serve.json"
"$PY" - "$OUT" <<'PYEOF'
import json, sys, torch
from pathlib import Path
out = Path(sys.argv[1])
cuda = torch.cuda.is_available()
figures = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
for name in ("score", "extract", "train", "serve"):
    figures[name] = json.loads((out / f"{name}.json").read_text())
(out / "gpu-check.json").write_text(json.dumps(figures, indent=2))
print(f"[gpu-check] figures in {out / 'gpu-check.json'}")
PYEOF
step "done"
