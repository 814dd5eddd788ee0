"""Typed containers for encoded images and captions (the cacheable output of the encoders).

Both are plain dataclasses of tensors that share their first (batch) dimension. They support
``.to(device)``, indexing / slicing along the batch (``emb[3]``, ``emb[10:20]``, ``emb[idx]``),
``len()`` and ``Cls.cat([...])``, which pads the fragment dimension when the parts differ in it
(padding is masked, so scores do not change).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

__all__ = ["ImageEmbeddings", "TextEmbeddings", "slot_span"]


class _Embeddings:
    """Shared batch conveniences; subclasses list how many fragment dims each field has."""

    # field name -> number of leading fragment dimensions after the batch dim to pad in cat()
    _pad_dims: ClassVar[dict[str, int]] = {}

    def _items(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def __len__(self) -> int:
        return next(iter(self._items().values())).shape[0]

    def __getitem__(self, index: Any):
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return type(self)(**{k: v[index] for k, v in self._items().items()})

    def to(self, *args: Any, **kwargs: Any):
        """Move every tensor like ``Tensor.to``; floating-point dtype casts spare masks/ids."""
        out = {}
        for k, v in self._items().items():
            if v.is_floating_point():
                out[k] = v.to(*args, **kwargs)
            else:
                out[k] = v.to(device=_device_of(args, kwargs, v))
        return type(self)(**out)

    @property
    def device(self) -> torch.device:
        return next(iter(self._items().values())).device

    @classmethod
    def cat(cls, parts: list):
        """Concatenate along the batch, padding the fragment dims to the largest part."""
        if not parts:
            raise ValueError("cat() needs at least one part")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        size = max(getattr(p, names[0]).shape[1] for p in parts)
        out = {}
        for name in names:
            ndim = cls._pad_dims[name]
            tensors = []
            for p in parts:
                t = getattr(p, name)
                if ndim and t.shape[1] != size:
                    shape = list(t.shape)
                    shape[1 : 1 + ndim] = [size] * ndim
                    padded = t.new_full(shape, _pad_value(name, t))
                    padded[(slice(None), *(slice(0, n) for n in t.shape[1 : 1 + ndim]))] = t
                    t = padded
                tensors.append(t)
            out[name] = torch.cat(tensors, dim=0)
        return cls(**out)


def slot_span(mask: torch.Tensor) -> torch.Tensor:
    """(N,) long: 1 + the last valid slot of each row of a (N, S) bool mask (0 for none)."""
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.bool() * pos).amax(dim=1) if mask.shape[1] else mask.new_zeros(len(mask)).long()


def _pad_value(name: str, like: torch.Tensor) -> float | bool:
    if like.dtype == torch.bool:
        return False
    return float("-inf") if name == "log_prominence" else 0


def _device_of(args: tuple, kwargs: dict, like: torch.Tensor) -> torch.device:
    if "device" in kwargs:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return like.device


@dataclass
class ImageEmbeddings(_Embeddings):
    """Encoded images (B images, R region slots, d = embed_dim).

    Attributes:
        regions: (B, R, d) unit-norm region embeddings; padded slots are exactly zero.
        mask: (B, R) bool, valid regions.
        gram: (B, R, R) region Gram matrix V V^T, computed once per image.
        gate_self: (B, R) u_r . v_r + b_r, the region's own term of its fusion gate.
        gate_context: (B, R) u_wc . v_r, so a word's gate term u_wc . ctx_w = A_w . gate_context.
    """

    regions: torch.Tensor
    mask: torch.Tensor
    gram: torch.Tensor
    gate_self: torch.Tensor
    gate_context: torch.Tensor

    _pad_dims: ClassVar[dict[str, int]] = {
        "regions": 1,
        "mask": 1,
        "gram": 2,
        "gate_self": 1,
        "gate_context": 1,
    }

    def region_span(self) -> torch.Tensor:
        """(B,) long: 1 + the last valid region slot of each image (0 for none)."""
        return slot_span(self.mask)

    def narrow_regions(self, length: int) -> ImageEmbeddings:
        """Keep the first ``length`` region slots (the caller checks nothing valid is cut)."""
        return ImageEmbeddings(
            regions=self.regions[:, :length],
            mask=self.mask[:, :length],
            gram=self.gram[:, :length, :length],
            gate_self=self.gate_self[:, :length],
            gate_context=self.gate_context[:, :length],
        )


@dataclass
class TextEmbeddings(_Embeddings):
    """Encoded captions (C captions, L word slots, d = embed_dim).

    Word slots are the tokenizer positions after [CLS]; [SEP] and padding are masked out.

    Attributes:
        words: (C, L, d) unit-norm word embeddings; masked slots are exactly zero.
        mask: (C, L) bool, valid words.
        gram: (C, L, L) word Gram matrix W W^T, computed once per caption.
        gate_self: (C, L) u_w . w_l + b_w, the word's own term of its fusion gate.
        gate_context: (C, L) u_rc . w_l, so a region's gate term u_rc . ctx_r = B_r . gate_context.
        log_prominence: (C, L) log-softmax over valid words of the prominence MLP (-inf masked).
        token_ids: (C, L) long, the tokenizer ids of the word slots (for display / targets).
    """

    words: torch.Tensor
    mask: torch.Tensor
    gram: torch.Tensor
    gate_self: torch.Tensor
    gate_context: torch.Tensor
    log_prominence: torch.Tensor
    token_ids: torch.Tensor

    def word_span(self) -> torch.Tensor:
        """(C,) long: 1 + the last valid word slot of each caption (0 for none)."""
        return slot_span(self.mask)

    def narrow_words(self, length: int) -> TextEmbeddings:
        """Keep the first ``length`` word slots (the caller checks nothing valid is cut)."""
        return TextEmbeddings(
            words=self.words[:, :length],
            mask=self.mask[:, :length],
            gram=self.gram[:, :length, :length],
            gate_self=self.gate_self[:, :length],
            gate_context=self.gate_context[:, :length],
            log_prominence=self.log_prominence[:, :length],
            token_ids=self.token_ids[:, :length],
        )

    _pad_dims: ClassVar[dict[str, int]] = {
        "words": 1,
        "mask": 1,
        "gram": 2,
        "gate_self": 1,
        "gate_context": 1,
        "log_prominence": 1,
        "token_ids": 1,
    }
