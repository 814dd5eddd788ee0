r"""Training losses: bidirectional triplet ranking (VSE++) and word-prominence supervision.

Triplet ranking over an image x caption similarity matrix s (B, C) with positive set P
(P_ij: caption j describes image i; by default the diagonal):

    max_violation:  L = sum_{(i,j) in P} [m + max_{j' not in P_i} s_ij' - s_ij]_+
                                       + [m + max_{i' not in P^j} s_i'j - s_ij]_+
    otherwise:      the max is replaced by a sum over all negatives (warm-up).

Prominence supervision: a word that recurs across the other captions of its image, more than it
occurs in the captions of other images of the batch, is prominent:

    t_l = [ rate(token_l in the other captions of the same image)
            - rate(token_l in the captions of other images) ]_+
    L_prom = sum over captions with sum t > 0 of  KL(q || p),   q_l = t_l / sum t

where p is the caption's prominence distribution (``TextEmbeddings.log_prominence``), summed
over the batch like the triplet loss, so that ``train.recurrence_weight`` keeps its meaning at
any batch size: as a mean it was too small beside the summed triplet loss to move the
prominence MLP at all (docs/lab-notes.md).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ContrastiveLoss", "prominence_loss"]


class ContrastiveLoss(nn.Module):
    """Bidirectional hinge triplet loss, summed over the positives (as VSE++ / SCAN).

    Args:
        margin: the hinge margin m.
        max_violation: hardest in-batch negative only (VSE++); False = sum over all negatives.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True) -> None:
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(
        self,
        sims: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        caption_image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            sims: (B, C) image x caption scores.
            image_ids: (B,) id of each row's image. Alone (square sims, one image per pair,
                possibly repeated): rows/columns with the same id are positives of each other.
            caption_image_ids: (C,) image id of each caption, for a non-square batch where
                every image appears once in the rows.

        Returns:
            scalar loss.
        """
        B, C = sims.shape
        if image_ids is None and caption_image_ids is None:
            if B != C:
                raise ValueError("non-square sims need image_ids and caption_image_ids")
            pos = torch.eye(B, dtype=torch.bool, device=sims.device)
        else:
            if image_ids is None:
                raise ValueError("caption_image_ids needs image_ids for the rows")
            cap_ids = image_ids if caption_image_ids is None else caption_image_ids
            pos = image_ids.to(sims.device)[:, None] == cap_ids.to(sims.device)[None, :]
        pos_i, pos_j = pos.nonzero(as_tuple=True)  # the positive pairs
        d = sims[pos_i, pos_j]  # (P,)
        neg_caps = ~pos[pos_i]  # (P, C) negatives of each positive's image
        neg_imgs = ~pos[:, pos_j].T  # (P, B) negatives of each positive's caption
        row = sims[pos_i]  # (P, C)
        col = sims[:, pos_j].T  # (P, B)
        if self.max_violation:
            hard_cap = row.masked_fill(~neg_caps, float("-inf")).max(dim=1).values
            hard_img = col.masked_fill(~neg_imgs, float("-inf")).max(dim=1).values
            cost_c = (self.margin + hard_cap - d).clamp_min(0)
            cost_i = (self.margin + hard_img - d).clamp_min(0)
            return cost_c.sum() + cost_i.sum()
        cost_c = (self.margin + row - d[:, None]).clamp_min(0) * neg_caps
        cost_i = (self.margin + col - d[:, None]).clamp_min(0) * neg_imgs
        return cost_c.sum() + cost_i.sum()


def prominence_loss(log_prominence: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL divergence from the normalised recurrence targets to the prominence distribution.

    The cross-entropy against the targets has the same gradient, but its value never falls
    below the targets' own entropy, so a log of it reads as a loss that cannot be fitted;
    the divergence is 0 at a perfect fit.

    Args:
        log_prominence: (C, L) log p over valid words (-inf at masked words).
        targets: (C, L) non-negative targets (``cpfean.recurrence.sibling_targets``).

    Returns:
        scalar, sum over captions with a non-zero target (0 when there is none).
    """
    total = targets.sum(-1, keepdim=True)  # (C, 1)
    keep = total.squeeze(-1) > 0
    if not keep.any():
        return log_prominence.clamp_min(-1e4).sum() * 0  # keeps the graph connected
    q = targets[keep] / total[keep]
    on = q > 0
    logp = log_prominence[keep].masked_fill(~on, 0)  # avoid 0 * -inf
    logq = q.masked_fill(~on, 1).log()
    return (q * (logq - logp)).sum()
