"""What a trained model's components do, measured on data: the questions behind the lab notes'
"why does this component hurt here".

``region_report``: how alike an image's region embeddings are (mean pairwise cosine of its
distinct valid regions; words pick out regions only if these differ) and, per layer of a region
Transformer, the size of its attention and feed-forward updates against their input, how alike
those updates are across an image's regions, and the attention's entropy.

``recurrence_report``: how the caption's prominence distribution p fits the recurrence targets
q over seeded training-like batches: q's own entropy (the floor of the cross-entropy), KL(q||p)
of the model and of a uniform p, p's entropy, and the share of q on function words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from cpfean.data.captions import CaptionSet
from cpfean.data.dataset import CaptionPairDataset, ImageDataset, PairCollator, collate_regions
from cpfean.data.region_store import RegionStore
from cpfean.model.loss import prominence_loss
from cpfean.recurrence import function_word_ids, sibling_targets

__all__ = ["recurrence_report", "region_report", "within_image_cosine"]


def within_image_cosine(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the pairs of distinct valid rows of each image.

    Args:
        x: (B, R, d) vectors (any norm).
        mask: (B, R) bool valid rows.

    Returns:
        (B,) float, NaN for an image with fewer than two valid rows.
    """
    u = F.normalize(x.float(), dim=-1) * mask[..., None]
    n = mask.sum(-1).float()
    total = u.sum(1).pow(2).sum(-1)  # sum over all ordered pairs, self-pairs included
    self_pairs = (u.pow(2).sum(-1)).sum(-1)
    pairs = n * (n - 1)
    return torch.where(pairs > 0, (total - self_pairs) / pairs.clamp_min(1), math.nan)


def _mean(values: torch.Tensor) -> float:
    values = values[~values.isnan()]
    return round(float(values.mean()), 4) if values.numel() else math.nan


def _layer_values(layer, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per valid region (norms, entropy) or per image (cosines): the two residual updates of a
    pre-norm ``nn.TransformerEncoderLayer`` in eval mode, given its input ``x``."""
    h = layer.norm1(x)
    attn, weights = layer.self_attn(
        h, h, h, key_padding_mask=~mask, need_weights=True, average_attn_weights=False
    )  # weights (B, heads, R, R)
    ff = layer.linear2(layer.activation(layer.linear1(layer.norm2(x + attn))))
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)  # (B, heads, R)
    n = mask.sum(-1).float().clamp_min(2)
    entropy = (entropy / n.log()[:, None, None]).mean(1)  # (B, R), 1 = uniform attention
    return {
        "input_norm": x.norm(dim=-1)[mask],
        "attention_update_norm": attn.norm(dim=-1)[mask],
        "feedforward_update_norm": ff.norm(dim=-1)[mask],
        "attention_update_within_image_cosine": within_image_cosine(attn, mask),
        "feedforward_update_within_image_cosine": within_image_cosine(ff, mask),
        "attention_entropy_over_uniform": entropy[mask],
    }


@torch.no_grad()
def region_report(
    model, store: RegionStore, image_ids: Sequence[str], *, batch_size: int = 128
) -> dict:
    """Region-embedding similarity of ``image_ids`` and, with a region Transformer, its layers."""
    model.eval()
    encoder = model.region_encoder
    layers = list(encoder.transformer.layers) if encoder.transformer is not None else []
    inputs: dict[int, torch.Tensor] = {}  # each layer's input in the current batch
    hooks = [
        layer.register_forward_pre_hook(
            lambda _mod, args, kwargs, k=k: inputs.update({k: args[0] if args else kwargs["src"]}),
            with_kwargs=True,
        )
        for k, layer in enumerate(layers)
    ]
    values: dict[str, list[torch.Tensor]] = {}
    device = next(model.parameters()).device
    loader = DataLoader(
        ImageDataset(store, image_ids), batch_size=batch_size, collate_fn=collate_regions
    )
    try:
        for batch in loader:
            batch = batch.to(device)
            mask = batch.mask
            values.setdefault("region_within_image_cosine", []).append(
                within_image_cosine(encoder(batch), mask)
            )
            for k, layer in enumerate(layers):
                for key, v in _layer_values(layer, inputs[k], mask).items():
                    values.setdefault(f"{k}/{key}", []).append(v)
    finally:
        for hook in hooks:
            hook.remove()
    report: dict = {"images": len(image_ids)}
    for name, parts in values.items():
        layer, _, key = name.rpartition("/")
        target = report.setdefault(f"transformer_layer_{layer}", {}) if layer else report
        target[key] = _mean(torch.cat(parts))
    return report


@torch.no_grad()
def recurrence_report(
    model,
    store: RegionStore,
    captions: CaptionSet,
    *,
    batches: int = 20,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Fit of the prominence to the recurrence targets, per caption with a target, over
    ``batches`` random batches drawn as in training (``seed`` fixes them)."""
    model.eval()
    device = next(model.parameters()).device
    dataset = CaptionPairDataset(store, captions.image_ids, captions.captions)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)),
        collate_fn=PairCollator(model.tokenize, with_siblings=True),
    )
    function_words = function_word_ids(model.tokenize).to(device)
    sums = dict.fromkeys(
        ("target_entropy", "kl_model", "kl_uniform", "prominence_entropy", "function_word_share"),
        0.0,
    )
    n = 0
    for k, batch in enumerate(loader):
        if k == batches:
            break
        txt = model.encode_texts(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        siblings, image_index = batch["sibling_ids"].to(device), batch["image_index"].to(device)
        t = sibling_targets(txt.token_ids, txt.mask, siblings, image_index)
        keep = t.sum(-1) > 0
        q = t[keep] / t[keep].sum(-1, keepdim=True)
        log_p = txt.log_prominence.float()
        log_uniform = -txt.mask.sum(-1, keepdim=True).float().log().expand_as(log_p)
        p = log_p[keep].exp()  # 0 at masked words
        sums["target_entropy"] += float(-(q * q.clamp_min(1e-30).log()).sum())
        sums["kl_model"] += float(prominence_loss(log_p, t))
        sums["kl_uniform"] += float(prominence_loss(log_uniform, t))
        sums["prominence_entropy"] += float(-(p * log_p[keep].clamp_min(-1e4)).sum())
        function = torch.isin(txt.token_ids[keep], function_words)
        sums["function_word_share"] += float((q * function).sum())
        n += int(keep.sum())
    return {"captions": n, **{key: round(v / max(n, 1), 4) for key, v in sums.items()}}
