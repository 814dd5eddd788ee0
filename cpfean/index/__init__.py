"""The retrieval index: an encoded gallery on disk, tied to the checkpoint that encoded it.

Layout of an index directory (no pickle anywhere; every array is a ``.npy`` memory map)::

    index.json                  format, version, generation, checkpoint {path, sha256},
                                config, regions store, images root, count, label names,
                                field specs, created
    gen-NNNNNN/                 the arrays of one build (index.json names the current one):
    images/ids.json             [N] image ids (paths relative to the images root)
    images/digests.npy          [N] the region store's digest of each image's record
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

(``images/`` and ``captions/`` below are inside the generation folder; an index written before
generations has them beside index.json, and is read as it is.)

Building is resumable: the gallery is encoded in shards of ``shard_size`` images under
``<out>.building/shards/``; a shard is written to a temporary name and renamed when whole, and a
re-run skips whole shards. A build writes a new generation folder, syncs it, then replaces
``index.json`` in one rename: a reader, or a kill at any moment, sees the old index or the new
one whole. The generation it replaced is kept (a server may still be answering from it) and
older ones are removed. When the index there was built by the same checkpoint with the same
dtype, codec and images root, a build is an update: images whose record digest is unchanged
keep their rows (and codes: the fitted codec is kept), only new and changed ones are encoded,
gone ones are dropped, and captions already encoded are linked, not encoded again. One build
at a time holds ``.<out>.lock``; a build replaces ``<out>`` only when it is an index
(``index.json`` of this format, nothing foreign beside it) or an empty folder, never another
folder. ``index.json`` records a build key over everything that decides the content
(checkpoint, store content, ids, captions, dtype, images root), so a stale index is never taken
for an up-to-date one.
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
