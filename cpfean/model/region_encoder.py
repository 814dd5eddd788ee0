r"""Region encoder: detector regions -> unit-norm region embeddings.

For region r with feature f_r (D), normalised box (x1, y1, x2, y2), label id c_r and detection
score s_r:

    x_r = W_f f_r + b_f                                                (projection to d)
        + MLP_box([x1, y1, x2, y2, (x2 - x1)(y2 - y1)])               (use_spatial)
        + [c_r >= 0] s_r * gamma_r * p_r                               (use_label_prior)
    p_r = W_p T[c_r],   gamma_r = sigmoid(W_g [x_r; p_r] + b_g)   (d-dim gate; x_r before prior)

Every add-on starts as a no-op and grows only as far as training finds it useful: the last
layer of MLP_box, W_p (with its bias) and the output layers of both residual branches of each
Transformer layer start at zero, so at initialisation the region embedding is the projected
feature alone (as in SCAN). With default initialisation the add-ons started as large as the
feature and buried the content the words must match under noise (docs/lab-notes.md).

T (K, H) is the label-name table: each name of the detector vocabulary encoded once by the
pretrained text encoder and mean-pooled, kept as a buffer so checkpoints carry it. Then a
Transformer encoder over the valid regions (key padding mask) and L2 normalisation; padded
slots come out exactly zero whatever they held on input.

With ``center_context`` the Transformer's update u_r = T(x)_r - x_r loses its mean over the
image's valid regions, x_r + u_r - mean_r' u_r': left free, the layer learns to add one
image-wide vector to every region, which fits the training images but makes an image's regions
alike, so a word can no longer pick out its region (docs/lab-notes.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from cpfean.data.dataset import RegionBatch

__all__ = ["RegionEncoder"]


def _zero_(layer: nn.Linear) -> nn.Linear:
    """Zero a layer that adds into the region embedding, so its component starts as a no-op."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class RegionEncoder(nn.Module):
    """Args:
    feature_dim: D, detector feature size.
    embed_dim: d.
    label_table: (K, H) label-name embeddings, or None for no label prior.
    use_spatial: add the box embedding.
    use_transformer: run a Transformer encoder over the regions.
    layers, heads, ff_dim, dropout: the Transformer's shape.
    center_context: remove the image-wide mean of the Transformer's update.
    """

    def __init__(
        self,
        *,
        feature_dim: int,
        embed_dim: int,
        label_table: torch.Tensor | None,
        use_spatial: bool,
        use_transformer: bool,
        layers: int,
        heads: int,
        ff_dim: int,
        dropout: float,
        center_context: bool = False,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, embed_dim)
        self.spatial = None
        if use_spatial:
            hidden = min(256, embed_dim)
            self.spatial = nn.Sequential(
                nn.Linear(5, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim)
            )
            _zero_(self.spatial[-1])
        self.label_proj = self.label_gate = None
        if label_table is not None:
            self.register_buffer("label_table", label_table.detach().clone(), persistent=True)
            self.label_proj = nn.Linear(label_table.shape[1], embed_dim)
            _zero_(self.label_proj)
            self.label_gate = nn.Linear(2 * embed_dim, embed_dim)
        self.transformer = None
        self.center_context = center_context
        if use_transformer and layers > 0:
            layer = nn.TransformerEncoderLayer(
                embed_dim,
                heads,
                dim_feedforward=ff_dim,
                dropout=dropout,
                batch_first=True,
                norm_first=True,
            )
            self.transformer = nn.TransformerEncoder(
                layer, num_layers=layers, enable_nested_tensor=False
            )
            for block in self.transformer.layers:  # residual branches start at zero
                _zero_(block.self_attn.out_proj)
                _zero_(block.linear2)

    def forward(self, regions: RegionBatch) -> torch.Tensor:
        """Args:
            regions: features (B, R, D), boxes (B, R, 4) xyxy normalised to [0, 1], labels
                (B, R) long (-1 for padding / unknown), scores (B, R), mask (B, R) bool.

        Returns:
            (B, R, d) unit-norm region embeddings, zero at padded slots.
        """
        features, boxes, labels, scores = (
            regions.features,
            regions.boxes,
            regions.labels,
            regions.scores,
        )
        mask = regions.mask.bool()
        m = mask[..., None]  # (B, R, 1)
        # where() rather than multiplication so NaN/inf garbage in padded slots cannot leak
        features = torch.where(m, features, 0)
        x = self.proj(features)  # (B, R, d)
        if self.spatial is not None:
            b = torch.where(m, boxes, 0).to(x.dtype)
            area = (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)
            x = x + self.spatial(torch.cat([b, area[..., None]], dim=-1))
        if self.label_proj is not None:
            known = mask & (labels >= 0) & (labels < self.label_table.shape[0])  # (B, R)
            prior = self.label_proj(self.label_table[torch.where(known, labels, 0)])  # (B, R, d)
            gate = torch.sigmoid(self.label_gate(torch.cat([x, prior], dim=-1)))
            weight = torch.where(known, scores, 0).to(x.dtype)[..., None]  # (B, R, 1)
            x = x + weight * gate * prior
        if self.transformer is not None:
            pad = ~mask
            pad = pad & ~pad.all(dim=1, keepdim=True)  # an image with no region: avoid NaN
            y = self.transformer(x, src_key_padding_mask=pad)
            if self.center_context:
                update = torch.where(m, y - x, 0)
                mean = update.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
                y = x + update - mean
            x = y
        return torch.where(m, F.normalize(x, dim=-1), 0)
