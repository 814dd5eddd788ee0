"""The retrieval index: an encoded gallery on disk, tied to the checkpoint that encoded it.

Layout of an index directory (no pickle anywhere; every array is a ``.npy`` memory map)::

    index.json                  format, version, checkpoint {path, sha256}, config, regions
                                store, images root, count, label names, field specs, created
    images/ids.json             [N] image ids (paths relative to the images root)
    images/emb.<field>.npy      each field of the model's ImageEmbeddings, [N, ...]
                                (regions [N, R, d], mask, gram [N, R, R], gate terms, ...)
    images/pooled.npy           [N, d] float32 unit-norm pooled embeddings (first stage)
    images/boxes.npy            [N, R, 4] float32 xyxy pixels; labels.npy [N, R] int32
                                (-1 = padding); hw.npy [N, 2] int32 (original image h, w)
    captions/texts.json         {"captions": [C] str, "image_ids": [C] str} (optional)
    captions/emb.<field>.npy    each field of the TextEmbeddings, [C, ...]
    captions/pooled.npy         [C, d] float32

With a codec (``build_index(codec="SQ4")``, version 2; ``cpfean.index.codec``), the regions
are kept as codes over the valid regions only, and ``emb.regions`` / ``emb.gram`` /
``emb.gate_*`` are replaced by::

    images/emb.mask.npy         [N, R] bool, as without a codec
    images/codec.npy            the fitted faiss codec (faiss.serialize_index bytes)
    images/codes.npy            [M, code_size] uint8, M = valid regions of all images in order
    images/offsets.npy          [N + 1] int64: image i's regions are rows offsets[i]:offsets[i+1]
    images/ragged.<field>.npy   [M] float16 per-region fields (gate terms); ragged.regions.npy
                                [M, d] float16 with ``exact_copy`` (the final re-rank)
    images/pooled.npy           [N, d] float16
    (the Gram matrices are derived from the decoded regions when read)

Building is resumable: the gallery is encoded in shards of ``shard_size`` images under
``<out>.building/shards/``; a shard is written to a temporary name and renamed when whole, and a
re-run skips whole shards. The final directory is assembled under a temporary name and renamed
into place, so ``<out>/index.json`` exists only for a whole index. One build at a time holds
``.<out>.lock``; a build replaces ``<out>`` only when it is an index (``index.json`` of this
format, nothing foreign beside it) or an empty folder, never another folder. ``index.json``
records a build key over everything that decides the content (checkpoint, store content, ids,
captions, dtype, images root), so a stale index is never taken for an up-to-date one.
"""

from cpfean.index.build import (
    IndexBuild,
    build_index,
    build_key,
    check_replaceable,
    ids_digest,
    images_root_of,
)
from cpfean.index.format import (
    FORMAT,
    VERSION,
    IndexFormatError,
    IndexMismatchError,
    pooled_images,
    pooled_texts,
)
from cpfean.index.reader import RetrievalIndex, search_index

__all__ = [
    "FORMAT",
    "VERSION",
    "IndexBuild",
    "IndexFormatError",
    "IndexMismatchError",
    "RetrievalIndex",
    "build_index",
    "build_key",
    "check_replaceable",
    "ids_digest",
    "images_root_of",
    "pooled_images",
    "pooled_texts",
    "search_index",
]
