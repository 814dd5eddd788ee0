# A CUDA image that runs the same install and commands as a bare machine.
# Not built in this project's CI (no Docker engine there); kept deliberately simple.
#   docker build -t cpfean .
#   docker run --gpus all -v $PWD/runs:/app/runs cpfean make demo
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3-pip git make build-essential \
        libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt Makefile ./
COPY scripts ./scripts
# With network access, D2_FROM_SOURCE=1 builds upstream Detectron2 with its CUDA ops.
ARG D2_FROM_SOURCE=0
RUN PYTHON=python3.11 D2_FROM_SOURCE=${D2_FROM_SOURCE} bash scripts/install.sh
COPY . .
CMD ["make", "demo"]
