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

from cpfean.model.layers import BoxEmbedding, LabelPrior, rename_on_load, zero_

if TYPE_CHECKING:
    from cpfean.data.dataset import RegionBatch

__all__ = ["RegionEncoder"]


class RegionEncoder(nn.Module):
    """Args:
    feature_dim: D, detector feature size.
    embed_dim: d.
    label_table: (K, H) label-name embeddings, or None for no label prior.
    use_spatial: add the box embedding.
    use_transformer: run a Transformer encoder over the regions.
    layers, heads, ff_dim, dropout: the Transformer's shape.
    center_context: remove the image-wide mean of the Transformer's update.
    norm_first: pre-norm layers (LayerNorm inside each residual branch); False is the
        original post-norm layer.
    zero_init: start each layer's residual branches at zero, so that the layer is the
        identity at initialisation; False keeps PyTorch's default initialisation.
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
        norm_first: bool = True,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, embed_dim)
        self.spatial = BoxEmbedding(embed_dim) if use_spatial else None
        self.label_prior = LabelPrior(label_table, embed_dim) if label_table is not None else None
        rename_on_load(
            self,
            {
                "label_table": "label_prior.table",
                "label_proj": "label_prior.proj",
                "label_gate": "label_prior.gate",
            },
        )
        self.transformer = None
        self.center_context = center_context
        if use_transformer and layers > 0:
            layer = nn.TransformerEncoderLayer(
                embed_dim,
                heads,
                dim_feedforward=ff_dim,
                dropout=dropout,
                batch_first=True,
                norm_first=norm_first,
            )
            self.transformer = nn.TransformerEncoder(
                layer, num_layers=layers, enable_nested_tensor=False
            )
            for block in self.transformer.layers if zero_init else []:
                zero_(block.self_attn.out_proj)
                zero_(block.linear2)

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
            x = x + self.spatial(boxes, mask, x.dtype)
        if self.label_prior is not None:
            x = x + self.label_prior(x, labels, scores, mask)
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
