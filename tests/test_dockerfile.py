"""What can be checked of the Dockerfile without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# CUDA base images by Ubuntu release -> the python3.X its archive installs as "python3.X"
UBUNTU_PYTHONS = {"20.04": {"3.8"}, "22.04": {"3.10", "3.11"}, "24.04": {"3.12"}}


def _lines() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_sources_are_copied_before_the_install():
    lines = _lines()
    install = next(i for i, line in enumerate(lines) if "scripts/install.sh" in line)
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY")]
    whole = [i for i in copies if lines[i] == "COPY . ." or "pyproject.toml" in lines[i]]
    assert whole and min(whole) < install, "the editable install needs the sources"


def test_the_base_provides_the_python_the_install_uses():
    lines = _lines()
    base = next(line for line in lines if line.startswith("FROM"))
    ubuntu = re.search(r"ubuntu(\d\d\.\d\d)", base).group(1)
    install = next(line for line in lines if "scripts/install.sh" in line)
    python = re.search(r"PYTHON=python(3\.\d+)", install).group(1)
    apt = next(line for line in lines if "apt-get install" in line)
    assert f"python{python}-venv" in apt.split() and f"python{python}" in apt.split()
    assert python in UBUNTU_PYTHONS[ubuntu], f"Ubuntu {ubuntu} ships no python{python}"
    assert python == "3.11"  # the Python the project's pins and CI use


def test_the_base_cuda_matches_the_pinned_torch():
    base = next(line for line in _lines() if line.startswith("FROM"))
    cuda = re.search(r"cuda:(\d+\.\d+)", base).group(1)
    pinned = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M)
    assert pinned and torch.__version__.split("+")[0] == pinned.group(1)
    if torch.version.cuda:  # the wheel the pin installs here is a CUDA build
        assert torch.version.cuda == cuda, (torch.version.cuda, cuda)


def test_the_documented_smoke_test_is_the_gpu_check():
    text = (REPO / "Dockerfile").read_text()
    assert "docker run --gpus all cpfean make gpu-check" in text
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^gpu-check:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "scripts/gpu_check.sh" in recipe.group(1)
    assert "make gpu-check" in (REPO / ".ci" / "run").read_text()
