"""Configuration of the CPFEAN matching model.

Defaults are the full model. Every component has a switch so the paper's ablations can be
re-run; the SCAN-style baseline (t2i AVG cross attention) is ``ModelConfig.scan_baseline()``.
Fields are plain types only, so the YAML config system can load and override them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cpfean.fields import bounded

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    # --- sizes ---------------------------------------------------------------------------
    feature_dim: int = bounded(
        2048, low=1
    )  # D, size of one detector region feature (2048 for BUTD ResNet-101)
    embed_dim: int = bounded(1024, low=1)  # d, size of the joint region/word embedding space
    # --- text side -----------------------------------------------------------------------
    text_encoder: str = "minilm"  # "minilm" (packaged offline), "tiny-random" (tests), or a path
    freeze_text_encoder: bool = False  # keep the BERT weights fixed (and in eval mode)
    # fix the embeddings and this many bottom layers of the text encoder: their backward pass,
    # most of a CPU training step, is skipped, and the top layers still adapt to the captions
    text_frozen_layers: int = bounded(0, low=0)
    # keep, per distinct training caption, what the frozen layers make of it, so that they run
    # once per caption rather than every step (float32 states, ~1.5 KB a token on the device)
    text_frozen_cache: bool = True
    max_words: int = bounded(32, low=1)  # max word tokens per caption, [CLS]/[SEP] not counted
    use_gcn: bool = True  # one residual GCN layer over the fully connected word graph
    # --- image side ----------------------------------------------------------------------
    use_spatial: bool = True  # add an MLP embedding of the normalised box (x1, y1, x2, y2, area)
    use_label_prior: bool = True  # add the gated, score-weighted text embedding of the label name
    use_region_transformer: bool = True  # Transformer encoder over the valid regions
    region_layers: int = bounded(1, low=1)  # number of Transformer encoder layers over regions
    region_heads: int = bounded(
        8, low=1
    )  # attention heads in the region Transformer (must divide embed_dim)
    region_ff_dim: int = bounded(2048, low=1)  # feed-forward width of the region Transformer
    dropout: float = bounded(0.1, low=0, below=1)  # dropout inside the region Transformer
    # subtract the image's mean Transformer update: otherwise it can add one image-wide vector
    # to every region, and an image's regions grow alike (docs/lab-notes.md)
    center_region_context: bool = False
    # pre-norm, and residual branches that start at zero: the layer starts as the identity and
    # cannot wash out the projected features before training asks it to (docs/scaling.md)
    region_norm_first: bool = True
    region_zero_init: bool = True
    # --- pairwise scoring ----------------------------------------------------------------
    use_fusion: bool = True  # gated cross-modal semantic fusion; off = plain cross attention
    use_prominence: bool = True  # learned word prominence pooling; off = uniform (x word gates)
    topk: int = bounded(
        3, low=0
    )  # regions each word aligns to; 0 = all regions with softmax attention
    # also score regions -> words, pooled with the region gates (off: trained with it CPFEAN
    # did not gain on the bundled scenes, docs/lab-notes.md)
    use_region_alignment: bool = False
    lambda_softmax: float = bounded(
        9.0, above=0
    )  # inverse temperature of the cross attention softmax (SCAN's λ)
    gate_cos_init: float = 5.0  # initial weight of cos(fragment, context) inside each gate

    # The SCAN-style baseline (t-i AVG) as switch values: every CPFEAN component off, softmax
    # cross attention over all regions, the word -> region direction only. The one definition
    # that `scan_baseline` and `pipelines.ablate`'s "scan" row both use.
    SCAN_BASELINE = {
        "use_gcn": False,
        "use_spatial": False,
        "use_label_prior": False,
        "use_region_transformer": False,
        "use_fusion": False,
        "use_prominence": False,
        "topk": 0,
        "use_region_alignment": False,
    }

    @classmethod
    def scan_baseline(cls, **overrides: object) -> ModelConfig:
        """SCAN t-i AVG: every CPFEAN component off, softmax cross attention over all regions
        (the word -> region direction only, SCAN's single-model form)."""
        return replace(cls(**cls.SCAN_BASELINE), **overrides)
