"""Slow explicit references for the scorer, with real d-dim context vectors.

``reference_pair_score`` follows the equations of ``fusion`` literally for ONE pair (tests check
the algebraic scorer against it). ``scan_t2i_naive`` is SCAN's evaluation loop (one caption at a
time against all images, explicit (n_images, L, d) contexts) used as the benchmark's baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpfean.model.embeddings import ImageEmbeddings, TextEmbeddings
from cpfean.model.fusion import Scoring

__all__ = ["reference_pair_score", "scan_t2i_naive"]


def reference_pair_score(
    img: ImageEmbeddings,
    txt: TextEmbeddings,
    scoring: Scoring,
) -> torch.Tensor:
    """Score of img[0] against txt[0], explicitly. Returns a 0-dim tensor."""
    gates, lambda_softmax, topk = scoring.gates, scoring.lambda_softmax, scoring.topk
    V = img.regions[0][img.mask[0]]  # (R, d) valid regions only
    W = txt.words[0][txt.mask[0]]  # (L, d) valid words only
    S = W @ V.T  # (L, R)
    logits = lambda_softmax * S
    g_w, g_r = torch.ones(len(W)), torch.ones(len(V))
    ctx_r = (lambda_softmax * S.T).softmax(-1) @ W  # (R, d) each region's word context
    if gates is not None:
        ctx_w = logits.softmax(-1) @ V  # (L, d) over all regions, before the gate prior
        g_w = torch.sigmoid(
            gates.word_cos * (W * ctx_w).sum(-1) / ctx_w.norm(dim=-1)
            + gates.word_self(W).squeeze(-1)
            + gates.word_ctx(ctx_w).squeeze(-1)
        )  # (L,)
        g_r = torch.sigmoid(
            gates.region_cos * (V * ctx_r).sum(-1) / ctx_r.norm(dim=-1)
            + gates.region_self(V).squeeze(-1)
            + gates.region_ctx(ctx_r).squeeze(-1)
        )  # (R,)
        logits = logits + g_r.log()[None]
    if 0 < topk < V.shape[0]:
        idx = S.topk(topk, dim=-1).indices  # (L, k)
        keep = torch.zeros_like(S, dtype=torch.bool).scatter_(-1, idx, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    context = logits.softmax(-1) @ V  # (L, d)
    s_l = F.cosine_similarity(W, context, dim=-1)
    if scoring.use_prominence:
        p = txt.log_prominence[0][txt.mask[0]].exp()
    else:
        p = torch.full((len(W),), 1.0 / len(W))
    pi = p * g_w
    score = (pi * s_l).sum()
    if scoring.region_alignment:
        s_r = F.cosine_similarity(V, ctx_r, dim=-1)  # (R,)
        score = 0.5 * (score + (g_r * s_r).sum() / len(V))
    return score


@torch.no_grad()
def scan_t2i_naive(
    regions: torch.Tensor, words: list[torch.Tensor], *, lambda_softmax: float
) -> torch.Tensor:
    """SCAN's ``xattn_score_t2i`` (softmax attention, AVG): a Python loop over captions.

    Args:
        regions: (B, R, d) unit-norm regions (all valid).
        words: C tensors (L_c, d), unit-norm words of each caption.

    Returns:
        (B, C) scores.
    """
    cols = []
    for cap in words:
        cap_i = cap[None].expand(regions.shape[0], -1, -1)  # (B, L, d)
        attn = torch.bmm(cap_i, regions.transpose(1, 2))  # (B, L, R)
        attn = (lambda_softmax * attn).softmax(-1)
        context = torch.bmm(attn, regions)  # (B, L, d) the explicit per-pair contexts
        cols.append(F.cosine_similarity(cap_i, context, dim=2).mean(1))  # (B,)
    return torch.stack(cols, dim=1)
