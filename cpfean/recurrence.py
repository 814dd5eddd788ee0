r"""Word-prominence targets from recurrence across ALL captions of an image.

The paper's prominence assumption: a word that the other captions of the same image repeat
is prominent. Random caption batches rarely hold two captions of one image, so the
targets are computed against the image's full caption set (its "siblings", tokenised by the
collator), with the batch's captions of other images as the background rate that cancels
words every caption uses ("a", "the", "of"):

    t_cl = [ mean_{s in siblings(c)} 1[token_cl in s]
             - mean_{c' in batch, img(c') != img(c)} 1[token_cl in c'] ]_+

(word-piece tokens; zero at padding). ``cpfean.model.loss.prominence_loss`` turns them into a
KL divergence from them to the caption's prominence distribution.

Captions of one image also share their phrasing ("the ... is left of the ..."), so function
words can recur more within an image than across the batch and win target mass that the
premise means for what is shown; ``ignore_ids`` (e.g. ``function_word_ids``) gives them none.
"""

from __future__ import annotations

import torch

# Closed-class English words and the spatial words captions use as prepositions: a word here
# names no thing or attribute, whatever its recurrence.
FUNCTION_WORDS = frozenset(
    """a an the this that these those some any each every no its it they them their there
    here is are was were be been being has have had do does did can will would may might
    of in on at to from by with without into onto over under above below near beside behind
    between among around across along through next front back top bottom left right side
    and or but nor so as than while where when which who whom whose what
    i you he she we me him her us my your our his""".split()
) | frozenset(".,;:!?-'\"()")


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


def function_word_ids(tokenize, words=FUNCTION_WORDS) -> torch.Tensor:
    """Token ids of the ``words`` that the tokenizer keeps as one word piece (sorted)."""
    specials = set(tokenize([""])["input_ids"][0].tolist())  # [CLS], [SEP] and the like
    ids = set()
    for word in sorted(words):
        pieces = [i for i in tokenize([word])["input_ids"][0].tolist() if i not in specials]
        if len(pieces) == 1:
            ids.add(pieces[0])
    return torch.tensor(sorted(ids), dtype=torch.long)


def sibling_targets(
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    sibling_ids: torch.Tensor,
    image_index: torch.Tensor,
    ignore_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Args:
        token_ids: (C, L) word token ids (``TextEmbeddings.token_ids``).
        mask: (C, L) bool valid words.
        sibling_ids: (C, S, T) from ``sibling_token_ids`` (-1 = none).
        image_index: (C,) image of each caption in the batch.
        ignore_ids: token ids that get no target (``function_word_ids``), or None.

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
    if ignore_ids is not None:
        mask = mask & ~torch.isin(token_ids, ignore_ids.to(token_ids.device))
    return (rate_same - rate_diff).clamp_min(0) * mask
