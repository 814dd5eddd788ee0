r"""Pairwise scoring algebra: cross-modal semantic fusion gates and prominent-fragment alignment.

For one pair (image with unit-norm regions V (R, d), caption with unit-norm words W (L, d)),
with per-item Gram matrices G_v = V V^T (R, R) and G_w = W W^T (L, L):

    S      = W V^T                                   (L, R)  region-word cosine similarities
    A      = softmax_r(lambda * S)   (valid regions) (L, R)  word -> region attention
    B^T    = softmax_l(lambda * S)   (valid words)   (L, R)  region -> word attention
    ctx_l  = sum_r A_lr v_r,   ctx_r = sum_l B^T_lr w_l      (never materialised)

Cross-modal semantic fusion: each fragment is fused with its cross-modal context into one gate
(the "prominence" the retrieval view draws), high for a fragment the other modality supports and
low for one it does not (a region no word needs, a word no region shows):

    g_l = sigmoid(a_w * <w_l, ctx_l> / |ctx_l| + u_w.w_l + b_w + u_wc.ctx_l)
    g_r = sigmoid(a_r * <v_r, ctx_r> / |ctx_r| + u_r.v_r + b_r + u_rc.ctx_r)

    <w_l, ctx_l> = sum_r A_lr S_lr          |ctx_l|^2 = sum_r A_lr (A G_v)_lr
    <v_r, ctx_r> = sum_l B^T_lr S_lr        |ctx_r|^2 = sum_l B^T_lr (G_w B^T)_lr
    u_wc.ctx_l  = sum_r A_lr (V u_wc)_r     u_rc.ctx_r = sum_l B^T_lr (W u_rc)_l

The gates enhance and suppress where the alignment pools (below): a region's gate weights it
among each word's top-k regions, a word's gate multiplies its prominence. They do not add the
context to the features. That variant (w^ = w + g ctx, v^ = v + g ctx, scored by
cos(w^, v^)) compares each fragment with a copy of itself: with g = 0.8 and sharp attention,
cosines of 0.5 and 0.3 both become 0.99, so the gap that ranks images nearly vanishes; it also
costs three more (bi, bc, L, R) products per block.

Prominent-fragment alignment: word l attends only to its top-k regions T_l on S (all valid
regions when topk = 0), with the region gates as log-priors, and scores the cosine of the word
with that context (SCAN's t-i form); words are pooled with the caption's prominence p_l (softmax
of an MLP over the caption's words, computed once per caption), each word's score scaled by its
gate:

    a_l   = softmax_{r in T_l}(lambda S_lr + log g_r)
    s_l   = cos(w_l, sum_r a_lr v_r) = (a_l . S_l) / sqrt(a_l^T G_v a_l)
    score = sum_l p_l g_l s_l                                    (sum_l p_l = 1)

(p uniform with prominence off; g = 1 with fusion off.) Attention over the top-k keeps a word
from averaging in regions it has nothing to do with, and pooling without renormalising over
the gated words keeps the few words a wrong image does show from carrying its score (the
forms compared: docs/lab-notes.md).

Region-to-word alignment (the other direction, where the region gates suppress): each region
scores the cosine with its word context, and the regions are pooled with their gates over the
image's valid regions (not renormalised by the gates, so a wrong image whose regions no word
supports cannot lift its few supported ones):

    s_r     = cos(v_r, ctx_r) = <v_r, ctx_r> / |ctx_r|              (both terms above)
    score_i = (1 / R_valid) sum_r g_r s_r
    score   = (score_t + score_i) / 2          (score_t: the word-pooled score above)

It costs nothing extra with fusion on (the gate terms already hold <v_r, ctx_r> and |ctx_r|);
without fusion g = 1 and it is SCAN's i-t AVG. It is a switch, off by default
(``ModelConfig.use_region_alignment``): trained with it CPFEAN did not gain on the bundled
scenes (docs/lab-notes.md). Fusion, prominence, top-k and this term all off = SCAN t-i AVG
exactly.

Implementation notes (all exact, tested against an explicit d-dim reference):
- a block of bi images x bc captions keeps everything on (bi, bc, L, R) or smaller; S is one
  matmul of the flattened words (bc*L, d) by the flattened regions (bi*R, d)^T;
- A = diag(1/Z_l) E and B^T = E diag(1/Z_r) with ONE E = exp(lambda (S - 1)) (masked; |S| <= 1
  so no overflow) for lambda <= 20; the 1/Z factors are folded into per-fragment scalars, so
  A and B^T are never materialised (two softmaxes are used for a larger lambda);
- [G_v | V u_wc] and [G_w; (W u_rc)^T] give the context norms and the gate terms in one
  batched matmul each;
- top-k uses the k-th largest value of S found by k rounds of max + mask, much cheaper than
  ``topk`` on CPU; all regions tied with the k-th are kept; |ctx_l|^2 comes from one batched
  product of the attention with G_v;
- half / bfloat16 inputs and autocast are scored in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cpfean.model.embeddings import ImageEmbeddings, TextEmbeddings

__all__ = ["FragmentGates", "Scoring", "score_block", "score_chunked"]

_NEG = -1e4  # finite "minus infinity": exp underflows to 0 yet gradients stay finite
_EPS = 1e-6
_SHARED_EXP_MAX_LAMBDA = 20.0  # 1/Z^2 <= exp(4 lambda) stays finite in float32


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dim, keepdim (ties with it count once each).
    k rounds of max + mask: much cheaper than ``topk`` for a small k on CPU."""
    if k >= x.shape[-1]:
        return x.amin(-1, keepdim=True)
    with torch.no_grad():
        work = x.clone()
        for _ in range(k - 1):
            work.masked_fill_(work >= work.amax(-1, keepdim=True), float("-inf"))
        return work.amax(-1, keepdim=True)


class FragmentGates(nn.Module):
    """Parameters of the fragment gates; the per-item terms are computed at encode time.

    Args:
        embed_dim: d.
        cos_init: initial weight a of cos(fragment, context) in each gate.
    """

    def __init__(self, *, embed_dim: int, cos_init: float) -> None:
        super().__init__()
        self.word_self = nn.Linear(embed_dim, 1)  # u_w, b_w
        self.word_ctx = nn.Linear(embed_dim, 1, bias=False)  # u_wc (applied to regions)
        self.region_self = nn.Linear(embed_dim, 1)  # u_r, b_r
        self.region_ctx = nn.Linear(embed_dim, 1, bias=False)  # u_rc (applied to words)
        self.word_cos = nn.Parameter(torch.tensor(float(cos_init)))  # a_w
        self.region_cos = nn.Parameter(torch.tensor(float(cos_init)))  # a_r
        for lin in (self.word_self, self.word_ctx, self.region_self, self.region_ctx):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.word_self.bias)
        nn.init.zeros_(self.region_self.bias)

    def image_terms(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """regions (B, R, d) -> gate_self (B, R) = u_r.v + b_r, gate_context (B, R) = u_wc.v."""
        return self.region_self(regions).squeeze(-1), self.word_ctx(regions).squeeze(-1)

    def text_terms(self, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """words (C, L, d) -> gate_self (C, L) = u_w.w + b_w, gate_context (C, L) = u_rc.w."""
        return self.word_self(words).squeeze(-1), self.region_ctx(words).squeeze(-1)


@dataclass(frozen=True)
class Scoring:
    """How a block is scored: the model's fusion gates and switches (``CPFEAN.scoring``).

    Args:
        gates: the fusion gates, or None for plain cross attention (fusion off).
        lambda_softmax: inverse temperature lambda of the cross attention.
        topk: regions per word (0 = softmax attention over all regions).
        use_prominence: pool words with the caption's prominence (else uniformly).
        region_alignment: average in the region-to-word score (gate-pooled region cosines).
    """

    gates: FragmentGates | None
    lambda_softmax: float
    topk: int
    use_prominence: bool
    region_alignment: bool = False


def score_block(
    img: ImageEmbeddings,
    txt: TextEmbeddings,
    scoring: Scoring,
    *,
    return_details: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores of every image in ``img`` against every caption in ``txt``.

    Args:
        img: bi images (regions (bi, R, d)).
        txt: bc captions (words (bc, L, d)).
        scoring: the gates and switches.
        return_details: also return the per-fragment numbers (keep the block small).

    Returns:
        (bi, bc) scores, and with ``return_details`` a dict of region_gates (bi, bc, R),
        word_gates / word_weights / word_scores (bi, bc, L), alignment (bi, bc, L, k) region
        indices, similarity (bi, bc, L, R) = S; with ``region_alignment`` also region_weights /
        region_scores (bi, bc, R) (g_r / R_valid and s_r).
    """
    device_type = img.regions.device.type
    low_precision = img.regions.dtype in (torch.float16, torch.bfloat16)
    if low_precision or torch.is_autocast_enabled(device_type):
        # 1/Z^2 and exp() need float32 range; the block is small enough to upcast
        with torch.autocast(device_type=device_type, enabled=False):
            return score_block(
                img.to(torch.float32), txt.to(torch.float32), scoring, return_details=return_details
            )
    gates, lambda_softmax, topk = scoring.gates, scoring.lambda_softmax, scoring.topk
    region_alignment = scoring.region_alignment
    S, rbias = _similarity(img, txt)  # (bi, bc, L, R), (bi, 1, 1, R)
    logits = torch.add(rbias, S, alpha=lambda_softmax)  # (bi, bc, L, R) alignment logits
    g_w = g_r = s_r = None
    if gates is not None:
        g_w, gr_logit, s_r_fused = _fusion_gates(img, txt, S, rbias, gates, lambda_softmax)
        g_r = torch.sigmoid(gr_logit)
        logits = logits + nn.functional.logsigmoid(gr_logit)[:, :, None, :]  # + log g_r
        if region_alignment:
            s_r = s_r_fused
    elif region_alignment:
        s_r = _plain_region_to_word(txt, S, lambda_softmax)
    A, align = _topk_attention(img, S, rbias, logits, topk, return_details)
    s_l = _word_scores(img, A, S)
    scores, pi, rho = _pool(img, txt, s_l, g_w, g_r, s_r, scoring.use_prominence)
    if not return_details:
        return scores
    return scores, _details(img, txt, S, A, align, s_l, pi, g_w, g_r, rho, s_r)


def _similarity(img: ImageEmbeddings, txt: TextEmbeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """S = W V^T for the block (one GEMM, then a view), and the additive region mask.

    Returns:
        S (bi, bc, L, R); rbias (bi, 1, 1, R): 0 at valid regions, -1e4 at padding.
    """
    V, W = img.regions, txt.words
    bi, R, d = V.shape
    bc, L, _ = W.shape
    S = (W.reshape(bc * L, d) @ V.reshape(bi * R, d).T).view(bc, L, bi, R)
    S = S.permute(2, 0, 1, 3).contiguous()  # (bi, bc, L, R)
    # additive masks (0 or -1e4): one fused pass with the scaling instead of a masked_fill
    rbias = torch.where(img.mask, 0.0, _NEG).to(S.dtype)[:, None, None, :]  # (bi, 1, 1, R)
    return S, rbias


def _fusion_gates(
    img: ImageEmbeddings,
    txt: TextEmbeddings,
    S: torch.Tensor,
    rbias: torch.Tensor,
    gates: FragmentGates,
    lambda_softmax: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fusion gates g_l and g_r of the module docstring, by algebra on S and the Grams.

    Returns:
        g_w (bi, bc, L) word gates; the region gates' logits (bi, bc, R); s_r (bi, bc, R) =
        cos(v_r, ctx_r), the region-to-word score.
    """
    bi, bc, L, R = S.shape
    # Unnormalised attentions A = diag(1/Z_l) Ea and B^T = Eb diag(1/Z_r): the 1/Z factors are
    # folded into per-fragment scalars, so A and B^T are never materialised.
    if lambda_softmax <= _SHARED_EXP_MAX_LAMBDA:
        # |S| <= 1, so exp(lambda (S - 1)) lies in [exp(-2 lambda), 1]: one exp, both ways
        Ea = torch.add(rbias - lambda_softmax, S, alpha=lambda_softmax).exp_()
        if not bool(txt.mask.all()):
            Ea = Ea * txt.mask.to(S.dtype)[None, :, :, None]
        Eb = Ea
        Zl, Zr = Ea.sum(-1), Ea.sum(-2)  # (bi, bc, L), (bi, bc, R)
        # padded words/regions: no attention. The inner where() keeps the reciprocal away
        # from 0: where() alone still sends 0 * inf = NaN back through the unused branch.
        iZl = torch.where(Zl > 0, torch.where(Zl > 0, Zl, 1.0).reciprocal(), 0)
        iZr = torch.where(Zr > 0, torch.where(Zr > 0, Zr, 1.0).reciprocal(), 0)
    else:  # large lambda: two proper softmaxes
        Ea = torch.add(rbias, S, alpha=lambda_softmax).softmax(-1)
        wbias = torch.where(txt.mask, 0.0, _NEG).to(S.dtype)[None, :, :, None]
        Eb = torch.add(wbias, S, alpha=lambda_softmax).softmax(-2)
        iZl, iZr = S.new_ones(bi, bc, L), S.new_ones(bi, bc, R)
    ES = Ea * S
    w_dot_ctx = ES.sum(-1) * iZl  # (bi, bc, L) <w_l, ctx_l>
    v_dot_ctx = (ES if Eb is Ea else Eb * S).sum(-2) * iZr  # (bi, bc, R) <v_r, ctx_r>
    # [G_v | V u_wc] (R, R+1): <ctx_l, v_r> and u_wc.ctx_l in one product
    Gv_ext = torch.cat([img.gram, img.gate_context[:, :, None]], dim=2)  # (bi, R, R+1)
    EGv_ext = torch.bmm(Ea.view(bi, bc * L, R), Gv_ext).view(bi, bc, L, R + 1)
    word_ctx_term = EGv_ext[..., R] * iZl  # (bi, bc, L) u_wc.ctx_l
    # |ctx_l|^2 = sum_r A_lr <ctx_l, v_r>, with EGv_ext[..., :R] = Z_l <ctx_l, v_r>
    ctx_w_sq = ((Ea * EGv_ext[..., :R]).sum(-1) * iZl * iZl).clamp_min(_EPS)
    # [G_w; (W u_rc)^T] (L+1, L) @ Eb (L, R): <w_l, ctx_r> and u_rc.ctx_r in one product
    Gw_ext = torch.cat([txt.gram, txt.gate_context[:, None, :]], dim=1)  # (bc, L+1, L)
    GwE_ext = torch.matmul(Gw_ext[None], Eb)  # (bi, bc, L+1, R)
    region_ctx_term = GwE_ext[:, :, L] * iZr  # (bi, bc, R) u_rc.ctx_r
    # |ctx_r|^2 = sum_l B^T_lr <w_l, ctx_r>, with GwE_ext[:, :, :L] = Z_r <w_l, ctx_r>
    ctx_r_sq = ((Eb * GwE_ext[:, :, :L]).sum(-2) * iZr * iZr).clamp_min(_EPS)
    g_w = torch.sigmoid(
        gates.word_cos * w_dot_ctx / ctx_w_sq.sqrt() + txt.gate_self[None] + word_ctx_term
    )  # (bi, bc, L)
    gr_logit = (
        gates.region_cos * v_dot_ctx / ctx_r_sq.sqrt() + img.gate_self[:, None] + region_ctx_term
    )  # (bi, bc, R)
    s_r = v_dot_ctx / ctx_r_sq.sqrt()  # (bi, bc, R) cos(v_r, ctx_r), 0 when padded
    return g_w, gr_logit, s_r


def _plain_region_to_word(
    txt: TextEmbeddings, S: torch.Tensor, lambda_softmax: float
) -> torch.Tensor:
    """s_r = cos(v_r, ctx_r) with plain region -> word attention B^T over the valid words
    (SCAN's i-t, the region-to-word term without fusion): (bi, bc, R)."""
    wbias = torch.where(txt.mask, 0.0, _NEG).to(S.dtype)[None, :, :, None]
    Bt = torch.add(wbias, S, alpha=lambda_softmax).softmax(-2)  # (bi, bc, L, R)
    GwB = torch.matmul(txt.gram[None], Bt)  # (bi, bc, L, R): <w_l, ctx_r>
    ctx_r_sq = (Bt * GwB).sum(-2).clamp_min(_EPS)
    return (Bt * S).sum(-2) / ctx_r_sq.sqrt()


def _topk_attention(
    img: ImageEmbeddings,
    S: torch.Tensor,
    rbias: torch.Tensor,
    logits: torch.Tensor,
    topk: int,
    return_details: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """a_l = softmax over each word's top-k regions T_l of (lambda S_lr + log g_r).

    Returns:
        A (bi, bc, L, R); the top-k region indices (bi, bc, L, k) when details are asked for
        and k < R, else None.
    """
    R = S.shape[-1]
    k = min(topk, R)
    align = None
    if 0 < k < R:
        Sr = S if bool(img.mask.all()) else S + rbias  # to rank: padded regions come last
        thr = _kth_largest(Sr.detach(), k)  # (bi, bc, L, 1)
        logits = logits.masked_fill(Sr < thr, _NEG)
        if return_details:
            align = Sr.topk(k, dim=-1).indices  # (bi, bc, L, k)
    return logits.softmax(-1), align


def _word_scores(img: ImageEmbeddings, A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """s_l = cos(w_l, sum_r a_lr v_r) = (a_l . S_l) / sqrt(a_l^T G_v a_l): (bi, bc, L)."""
    bi, bc, L, R = A.shape
    AGv = torch.bmm(A.view(bi, bc * L, R), img.gram).view(bi, bc, L, R)  # <ctx_l, v_r>
    ctx_sq = (A * AGv).sum(-1).clamp_min(_EPS)  # (bi, bc, L) |ctx_l|^2
    return (A * S).sum(-1) / ctx_sq.sqrt()


def _pool(
    img: ImageEmbeddings,
    txt: TextEmbeddings,
    s_l: torch.Tensor,
    g_w: torch.Tensor | None,
    g_r: torch.Tensor | None,
    s_r: torch.Tensor | None,
    use_prominence: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """score = sum_l p_l g_l s_l, averaged with (1 / R_valid) sum_r g_r s_r when the
    region-to-word term is on.

    Returns:
        scores (bi, bc); word weights p_l g_l (bi, bc, L); region weights (bi, bc, R) or None.
    """
    bi, bc, L = s_l.shape
    if use_prominence:
        p = txt.log_prominence.exp()  # (bc, L), 0 at masked words
    else:
        p = txt.mask.to(s_l.dtype) / txt.mask.sum(-1, keepdim=True).clamp_min(1)  # (bc, L)
    pi = p[None].expand(bi, bc, L) if g_w is None else p[None] * g_w  # (bi, bc, L)
    scores = (pi * s_l.masked_fill(~txt.mask[None], 0)).sum(-1)  # (bi, bc)
    rho = None
    if s_r is not None:
        R = img.mask.shape[1]
        valid_r = img.mask.to(s_l.dtype)  # (bi, R)
        rho = valid_r / valid_r.sum(-1, keepdim=True).clamp_min(1)  # 1 / R_valid at valid
        rho = rho[:, None].expand(bi, bc, R) if g_r is None else rho[:, None] * g_r
        scores = 0.5 * (scores + (rho * s_r.masked_fill(~img.mask[:, None], 0)).sum(-1))
    return scores, pi, rho


def _details(
    img: ImageEmbeddings,
    txt: TextEmbeddings,
    S: torch.Tensor,
    A: torch.Tensor,
    align: torch.Tensor | None,
    s_l: torch.Tensor,
    pi: torch.Tensor,
    g_w: torch.Tensor | None,
    g_r: torch.Tensor | None,
    rho: torch.Tensor | None,
    s_r: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The per-fragment numbers that explain a block's scores (see `score_block`)."""
    bi, bc, L, R = S.shape
    if align is None:  # attention over all regions: report the most attended one
        align = A.argmax(-1, keepdim=True)
    ones_r = img.mask[:, None, :].expand(bi, bc, R).to(S.dtype)
    details = {
        "region_gates": ones_r if g_r is None else g_r * ones_r,
        "word_gates": pi.new_ones(bi, bc, L) * txt.mask[None]
        if g_w is None
        else g_w * txt.mask[None],
        "word_weights": pi,
        "word_scores": s_l.masked_fill(~txt.mask[None], 0),
        "alignment": align,
        "similarity": S,
    }
    if rho is not None:
        details["region_weights"] = rho
        details["region_scores"] = s_r.masked_fill(~img.mask[:, None], 0)
    return details


def score_chunked(
    img: ImageEmbeddings,
    txt: TextEmbeddings,
    scoring: Scoring,
    *,
    image_chunk: int,
    text_chunk: int,
) -> torch.Tensor:
    """``score_block`` over blocks of image_chunk x text_chunk; returns (B, C) scores.

    Captions are grouped by length and images by their number of region slots, so that each
    block is cut to its own longest caption and its own fullest image (padding slots cost as
    much as fragments in the (bi, bc, L, R) block; they are masked, so scores do not change);
    rows and columns come back in the original order.
    """
    if len(img) == 0 or len(txt) == 0:
        return img.regions.new_zeros(len(img), len(txt))
    t_order, t_spans = _by_span(txt.word_span())
    i_order, i_spans = _by_span(img.region_span())
    blocks = [
        img[i_order[i : i + image_chunk]].narrow_regions(max(i_spans[i], 1))
        for i in range(0, len(img), image_chunk)
    ]
    cols = []
    for j in range(0, len(txt), text_chunk):  # text outer: one caption chunk copy at a time
        txt_j = txt[t_order[j : j + text_chunk]].narrow_words(max(t_spans[j], 1))
        cols.append(torch.cat([score_block(img_i, txt_j, scoring) for img_i in blocks], dim=0))
    out = torch.cat(cols, dim=1)[:, torch.argsort(t_order)]
    return out[torch.argsort(i_order)]


def _by_span(span: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The order that sorts fragment counts (N,) longest first, and the sorted counts (one
    host read)."""
    order = torch.argsort(span, descending=True, stable=True)
    return order, span[order].tolist()
