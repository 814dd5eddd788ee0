r"""The paper's small components as named layers, each with one job and its own test.

Every add-on starts as a no-op (its output layer at zero) and grows only as far as training
finds it useful; `region_encoder`, `text_encoder` and `model` document the equations. The
parameter names are those the earlier inline code had (``spatial.0``, ``label_table``,
``gcn_q``, ...) where a layer is a `Sequential`; the others map old checkpoint keys onto
theirs when loading (`rename_on_load`), so checkpoints written before still load.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BoxEmbedding", "LabelPrior", "Prominence", "WordGCN", "rename_on_load", "zero_"]


def zero_(layer: nn.Linear) -> nn.Linear:
    """Zero a layer's weight and bias, so the branch it ends adds nothing at first."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def rename_on_load(module: nn.Module, renames: dict[str, str]) -> None:
    """Read checkpoint keys ``old`` (relative to ``module``) as ``new`` when loading."""

    def hook(state_dict, prefix, *_args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            for old, new in renames.items():
                if rest == old or rest.startswith(old + "."):
                    state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                    break

    module._register_load_state_dict_pre_hook(hook)


class BoxEmbedding(nn.Sequential):
    """MLP_box([x1, y1, x2, y2, area]) -> d for normalised boxes; zero at padded slots' input."""

    def __init__(self, embed_dim: int) -> None:
        hidden = min(256, embed_dim)
        super().__init__(nn.Linear(5, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))
        zero_(self[-1])

    def forward(self, boxes: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """boxes (B, R, 4) xyxy in [0, 1], mask (B, R) -> (B, R, d)."""
        b = torch.where(mask[..., None], boxes, 0).to(dtype)
        area = (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)
        return super().forward(torch.cat([b, area[..., None]], dim=-1))


class LabelPrior(nn.Module):
    """The gated, score-weighted text embedding of a region's detected label:
    s_r * sigmoid(W_g [x_r; p_r] + b_g) * p_r with p_r = W_p T[c_r] (zero for unknown labels).

    ``table`` (K, H) is the label-name table: each detector class name encoded once by the
    text encoder, kept as a buffer so checkpoints carry it.
    """

    def __init__(self, table: torch.Tensor, embed_dim: int) -> None:
        super().__init__()
        self.register_buffer("table", table.detach().clone(), persistent=True)
        self.proj = zero_(nn.Linear(table.shape[1], embed_dim))
        self.gate = nn.Linear(2 * embed_dim, embed_dim)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, R, d) the regions before the prior; labels, scores, mask (B, R) -> (B, R, d)."""
        known = mask & (labels >= 0) & (labels < self.table.shape[0])
        prior = self.proj(self.table[torch.where(known, labels, 0)])
        gate = torch.sigmoid(self.gate(torch.cat([x, prior], dim=-1)))
        return torch.where(known, scores, 0).to(x.dtype)[..., None] * gate * prior


class WordGCN(nn.Module):
    """One residual graph convolution over the fully connected word graph:
    x_l + W_o (E x)_l with E = softmax over valid l' of (W_q x)(W_k x)^T / sqrt(d); W_o starts
    at zero, so the layer starts as the identity."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k = nn.Linear(embed_dim, embed_dim, bias=False)
        self.out = zero_(nn.Linear(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (C, L, d), mask (C, L) bool -> (C, L, d)."""
        aff = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        aff = aff.masked_fill(~mask[:, None, :], -1e4).softmax(-1)  # (C, L, L)
        return x + self.out(aff @ x)


class Prominence(nn.Sequential):
    """Word prominence logits: MLP d -> d/2 -> 1 with GELU (the softmax over a caption's valid
    words is taken by the caller). No output bias: a softmax cannot see it."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Linear(embed_dim // 2, 1, bias=False),
        )

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        """words (C, L, d) -> logits (C, L)."""
        return super().forward(words).squeeze(-1)
