# A CUDA image that runs the same install and commands as a bare machine.
# Not built in this project's CI (no Docker engine there); tests/test_dockerfile.py checks what
# can be checked without one.
#   docker build -t cpfean .
#   docker run --gpus all -v $PWD/runs:/app/runs -v $PWD/data:/app/data cpfean make demo
# The smoke test of a built image, every device path in under 8 minutes (scripts/gpu_check.sh):
#   docker run --gpus all cpfean make gpu-check
# CUDA 13.0 matches the torch wheel that requirements.txt pins (torch.version.cuda); Ubuntu
# 22.04 is the CUDA base whose archive ships python3.11 (24.04 ships only 3.12). The drawings
# and photographs the bundled data is made from come from Ubuntu's archive here (Debian 12's
# packages are what their file list in cpfean/scenes/photos.py was checked against).
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev git make build-essential \
        libgl1 libglib2.0-0 \
        openclipart-png mate-backgrounds plasma-workspace-wallpapers \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# the sources first: the install ends with an editable install of the project itself
COPY . .
# With network access, D2_FROM_SOURCE=1 builds upstream Detectron2 with its CUDA ops.
ARG D2_FROM_SOURCE=0
RUN PYTHON=python3.11 D2_FROM_SOURCE=${D2_FROM_SOURCE} bash scripts/install.sh
CMD ["make", "demo"]
