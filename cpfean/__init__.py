"""cpfean: fine-grained image-text retrieval with CPFEAN (arXiv 2311.02183).

The front door, one name per level of abstraction::

    import cpfean

    searcher = cpfean.Searcher.open("runs/demo/index")      # a model and its index, loaded once
    answer = searcher.text_to_images("a dog on grass", top_k=5)   # ranked, explained

    model, cfg, _ = cpfean.load_model("runs/demo/cpfean/best.pt")
    store = cpfean.RegionStore("runs/demo/regions")
    images = cpfean.encode_store(model, store, store.ids()[:8])  # cacheable embeddings
    texts = cpfean.encode_captions(model, ["a dog on grass", "a red car on the road"])
    scores = model.score(images, texts)                        # [8, 2], in chunks

- `load_model(checkpoint)`: the model (eval mode), its config and the checkpoint dict.
- `RegionStore(path)`: the detector stage's regions, read-only; `RegionRecord`, one image.
- `encode_store(model, store, ids)`, `encode_records(model, records)`,
  `encode_captions(model, captions)`: embeddings, batch by batch; the model's own
  `encode_images` takes one `RegionBatch`, `encode_texts` token tensors, and
  `score(images, texts)` pairs them.
- `build_index(...)`, `RetrievalIndex(path)`: an encoded gallery on disk
  (`cpfean.index.search_index` ranks it for one encoded query).
- `Searcher`: an index with its model, answering text, image and "more like this" queries with
  the words and regions that explain each result (what `pipelines.retrieve` and
  `pipelines.serve` call).
- `load_config(path, overrides)`: the typed config.

Names are imported on first use, so ``import cpfean`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "cpfean.checkpoint",
    "load_config": "cpfean.config",
    "RegionStore": "cpfean.data.region_store",
    "RegionRecord": "cpfean.data.region_store",
    "encode_store": "cpfean.encode",
    "encode_records": "cpfean.encode",
    "encode_captions": "cpfean.encode",
    "build_index": "cpfean.index",
    "RetrievalIndex": "cpfean.index",
    "Searcher": "cpfean.search",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cpfean' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
