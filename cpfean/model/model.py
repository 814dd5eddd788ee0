"""CPFEAN: region encoder + word encoder (cacheable) and the chunked pairwise scorer.

The equations are in ``region_encoder``, ``text_encoder`` and ``fusion`` (module docstrings).
The per-caption word prominence is p = softmax over valid words of MLP(w_l) (one scalar per
word, an MLP d -> d/2 -> 1 with GELU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cpfean.model.config import ModelConfig
from cpfean.model.embeddings import ImageEmbeddings, TextEmbeddings
from cpfean.model.fusion import FragmentGates, Scoring, score_block, score_chunked
from cpfean.model.layers import Prominence
from cpfean.model.region_encoder import RegionEncoder
from cpfean.model.text_encoder import WordEncoder, encode_names, load_text_backbone

if TYPE_CHECKING:
    from cpfean.data.dataset import RegionBatch

__all__ = ["CPFEAN", "build_model"]

TRAIN_TEXT_CHUNK = 16  # captions per scoring block in the training forward


class CPFEAN(nn.Module):
    """The matching model. Build it with ``build_model(cfg, label_names)``.

    Args:
        region_encoder: regions -> (B, R, d).
        word_encoder: token ids -> (C, L, d).
        tokenizer: the backbone's ``transformers`` tokenizer.
        gates: fusion gate parameters, None when fusion is off.
        use_prominence: learned word prominence pooling.
        topk: regions per word (0 = softmax attention over all).
        region_alignment: also score regions -> words (pooled with the region gates).
        lambda_softmax: cross attention inverse temperature.
        max_words: default word budget for ``tokenize``.
    """

    def __init__(
        self,
        *,
        region_encoder: RegionEncoder,
        word_encoder: WordEncoder,
        tokenizer,
        gates: FragmentGates | None,
        use_prominence: bool,
        topk: int,
        lambda_softmax: float,
        max_words: int,
        region_alignment: bool = False,
    ) -> None:
        super().__init__()
        self.region_encoder = region_encoder
        self.word_encoder = word_encoder
        self.tokenizer = tokenizer
        self.gates = gates
        self.topk = topk
        self.region_alignment = region_alignment
        self.lambda_softmax = lambda_softmax
        self.max_words = max_words
        self.prominence = None
        if use_prominence:
            d = word_encoder.proj.out_features
            self.prominence = Prominence(d)

    # ----------------------------------------------------------------------------- encoding
    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Captions -> {"input_ids": (C, T) long, "attention_mask": (C, T) long} on the CPU."""
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=(max_length or self.max_words + 2),
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_images(self, regions: RegionBatch) -> ImageEmbeddings:
        """B images' regions (`RegionBatch`: features, normalised boxes, labels, scores,
        mask) -> the cacheable ImageEmbeddings."""
        return self.image_embeddings(self.region_encoder(regions), regions.mask.bool())

    def image_embeddings(self, regions: torch.Tensor, mask: torch.Tensor) -> ImageEmbeddings:
        """Unit-norm regions (B, R, d) and mask (B, R) -> ImageEmbeddings with their Gram
        matrices and gate terms (``encode_images`` after the region encoder)."""
        gram = regions @ regions.transpose(1, 2)  # (B, R, R)
        zeros = regions.new_zeros(regions.shape[:2])
        gate_self, gate_context = (
            self.gates.image_terms(regions) if self.gates is not None else (zeros, zeros)
        )
        return ImageEmbeddings(
            regions=regions, mask=mask, gram=gram, gate_self=gate_self, gate_context=gate_context
        )

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEmbeddings:
        """Args: input_ids, attention_mask (C, T) from ``tokenize``. Returns TextEmbeddings."""
        W, mask, token_ids = self.word_encoder(input_ids, attention_mask)  # (C, L, d)
        return self.text_embeddings(W, mask, token_ids)

    def text_embeddings(
        self, words: torch.Tensor, mask: torch.Tensor, token_ids: torch.Tensor
    ) -> TextEmbeddings:
        """Unit-norm words (C, L, d), mask (C, L) and their token ids (C, L) -> TextEmbeddings
        with Gram matrices, gate terms and prominence (``encode_texts`` after the word encoder)."""
        gram = words @ words.transpose(1, 2)  # (C, L, L)
        zeros = words.new_zeros(words.shape[:2])
        gate_self, gate_context = (
            self.gates.text_terms(words) if self.gates is not None else (zeros, zeros)
        )
        logits = self.prominence(words) if self.prominence is not None else zeros
        log_prom = logits.masked_fill(~mask, float("-inf")).log_softmax(-1)
        log_prom = log_prom.masked_fill(~mask, float("-inf"))  # captions with no word
        return TextEmbeddings(
            words=words,
            mask=mask,
            gram=gram,
            gate_self=gate_self,
            gate_context=gate_context,
            log_prominence=log_prom,
            token_ids=token_ids,
        )

    # ------------------------------------------------------------------------------ scoring
    def score(
        self,
        img: ImageEmbeddings,
        txt: TextEmbeddings,
        image_chunk: int = 32,
        text_chunk: int = 128,
        return_details: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image x caption scores, computed block by block.

        Args:
            img: B encoded images.
            txt: C encoded captions (on the same device).
            image_chunk, text_chunk: block size; the (bi, bc, L, R) tensors dominate memory.
            return_details: also return per-fragment numbers (for a handful of pairs only):
                region_gates (B, C, R), word_gates / word_weights / word_scores (B, C, L),
                alignment (B, C, L, k) region indices per word, similarity (B, C, L, R);
                with region alignment also region_weights / region_scores (B, C, R).

        Returns:
            (B, C) scores (and the details dict).
        """
        if return_details:
            if len(img) * len(txt) > 4096:
                raise ValueError("return_details is meant for a few pairs; score fewer")
            return score_block(img, txt, self.scoring, return_details=True)
        return score_chunked(img, txt, self.scoring, image_chunk=image_chunk, text_chunk=text_chunk)

    @property
    def scoring(self) -> Scoring:
        """The gates and switches ``score`` passes to the scoring functions."""
        return Scoring(
            gates=self.gates,
            lambda_softmax=self.lambda_softmax,
            topk=self.topk,
            use_prominence=self.prominence is not None,
            region_alignment=self.region_alignment,
        )

    def forward(
        self,
        regions: RegionBatch,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        return_text: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, TextEmbeddings]:
        """Encode both sides and score all pairs: (B, C) (training).

        ``return_text`` also returns the TextEmbeddings (their prominence feeds an auxiliary
        loss; under DistributedDataParallel everything a loss uses must come out of forward).
        """
        img = self.encode_images(regions)
        txt = self.encode_texts(input_ids, attention_mask)
        # captions in chunks of similar length: each chunk's (B, bc, L, R) block is cut to its
        # own longest caption, so word padding costs no scoring time (the scores are the same)
        sims = self.score(img, txt, image_chunk=max(len(img), 1), text_chunk=TRAIN_TEXT_CHUNK)
        return (sims, txt) if return_text else sims


def build_model(cfg: ModelConfig, label_names: list[str]) -> CPFEAN:
    """Map a ModelConfig (and the detector vocabulary; [] when none) to a CPFEAN model.

    The label prior is skipped when ``label_names`` is empty (nothing to look up).
    """
    backbone, tokenizer = load_text_backbone(cfg.text_encoder)
    label_table = None
    if cfg.use_label_prior and label_names:
        label_table = encode_names(backbone, tokenizer, list(label_names))  # (K, H)
    region_encoder = RegionEncoder(
        feature_dim=cfg.feature_dim,
        embed_dim=cfg.embed_dim,
        label_table=label_table,
        use_spatial=cfg.use_spatial,
        use_transformer=cfg.use_region_transformer,
        layers=cfg.region_layers,
        heads=cfg.region_heads,
        ff_dim=cfg.region_ff_dim,
        dropout=cfg.dropout,
        center_context=cfg.center_region_context,
        norm_first=cfg.region_norm_first,
        zero_init=cfg.region_zero_init,
    )
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    word_encoder = WordEncoder(
        backbone=backbone,
        special_ids=[i for i in special if i is not None],
        embed_dim=cfg.embed_dim,
        use_gcn=cfg.use_gcn,
        freeze=cfg.freeze_text_encoder,
        frozen_layers=cfg.text_frozen_layers,
        frozen_cache=cfg.text_frozen_cache,
    )
    gates = (
        FragmentGates(embed_dim=cfg.embed_dim, cos_init=cfg.gate_cos_init)
        if cfg.use_fusion
        else None
    )
    model = CPFEAN(
        region_encoder=region_encoder,
        word_encoder=word_encoder,
        tokenizer=tokenizer,
        gates=gates,
        use_prominence=cfg.use_prominence,
        topk=cfg.topk,
        lambda_softmax=cfg.lambda_softmax,
        max_words=cfg.max_words,
        region_alignment=cfg.use_region_alignment,
    )
    return model
