r"""Word-prominence targets from recurrence across ALL captions of an image.

The paper's prominence assumption: a word that the other captions of the same image repeat
is prominent. Random caption batches rarely hold two captions of one image, so the
targets are computed against the image's full caption set (its "siblings", tokenised by the
collator), with the batch's captions of other images as the background rate that cancels
words every caption uses ("a", "the", "of"):

    t_cl = [ mean_{s in siblings(c)} 1[token_cl in s]
             - mean_{c' in batch, img(c') != img(c)} 1[token_cl in c'] ]_+

(word-piece tokens; zero at padding). ``cpfean.model.loss.prominence_loss`` turns them into a
cross-entropy against the caption's prominence distribution.
"""

from __future__ import annotations

import torch


def sibling_token_ids(tokenize, siblings: list[list[str]], captions: list[str]) -> torch.Tensor:
    """Token ids of each caption's siblings (its image's other captions).

    Args:
        tokenize: ``list[str] -> {"input_ids": (N, T)}`` (the model's tokenizer).
        siblings: per caption, all captions of its image (the caption itself is dropped once).
        captions: the batch's captions.

    Returns:
        (C, S, T) long, -1 where there is no sibling or no token.
    """
    others = []
    for caption, sibs in zip(captions, siblings, strict=True):
        rest = list(sibs)
        if caption in rest:
            rest.remove(caption)
        others.append(rest)
    S = max((len(o) for o in others), default=0)
    flat = [s for o in others for s in o]
    if not flat or S == 0:
        return torch.full((len(captions), 1, 1), -1, dtype=torch.long)
    tok = tokenize(flat)
    ids = torch.where(tok["attention_mask"].bool(), tok["input_ids"], -1)  # (N, T)
    out = torch.full((len(captions), S, ids.shape[1]), -1, dtype=torch.long)
    k = 0
    for c, o in enumerate(others):
        out[c, : len(o)] = ids[k : k + len(o)]
        k += len(o)
    return out


def sibling_targets(
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    sibling_ids: torch.Tensor,
    image_index: torch.Tensor,
) -> torch.Tensor:
    """Args:
        token_ids: (C, L) word token ids (``TextEmbeddings.token_ids``).
        mask: (C, L) bool valid words.
        sibling_ids: (C, S, T) from ``sibling_token_ids`` (-1 = none).
        image_index: (C,) image of each caption in the batch.

    Returns:
        (C, L) float targets in [0, 1], zero at masked words.
    """
    ids = torch.where(mask, token_ids, -2)  # -2 never matches a sibling's -1 padding
    in_sibling = (ids[:, :, None, None] == sibling_ids[:, None, :, :]).any(-1)  # (C, L, S)
    has_sibling = (sibling_ids >= 0).any(-1)  # (C, S)
    n_sib = has_sibling.sum(-1).clamp_min(1)  # (C,)
    rate_same = (in_sibling & has_sibling[:, None, :]).sum(-1) / n_sib[:, None]
    other = image_index[:, None] != image_index[None, :]  # (C, C)
    batch_ids = torch.where(mask, token_ids, -1)
    in_other = (ids[:, :, None, None] == batch_ids[None, None, :, :]).any(-1)  # (C, L, C)
    rate_diff = (in_other & other[:, None, :]).sum(-1) / other.sum(-1).clamp_min(1)[:, None]
    return (rate_same - rate_diff).clamp_min(0) * mask
