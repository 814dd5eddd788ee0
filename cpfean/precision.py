"""Which floating-point type a device computes fast: the mixed-precision choice of every
stage (CPFEAN training, the detector's training), in one place."""

from __future__ import annotations

import torch

__all__ = ["cpu_has_fast_bf16", "native_bf16", "training_precision"]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), not by emulation."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (recent CUDA cards, CPUs with
    AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def training_precision(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training forward, None for float32.

    bfloat16 where the device computes it natively: it keeps float32's range, so no loss
    scaling is needed. float16 on CUDA cards without bfloat16 (the caller scales the loss).
    Scoring upcasts its blocks to float32 itself (``score_block``), and evaluation runs in
    float32 whatever this says.
    """
    if not amp:
        return None
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None
