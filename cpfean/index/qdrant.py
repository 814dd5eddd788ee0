"""The first stage in Qdrant: pooled vectors and region multi-vectors in a sharded engine that
does MaxSim itself, CPFEAN re-ranking its candidates from the local index (``docs/scale.md``).

A collection mirrors one index: a point per image, its id derived from the image id (so an
update upserts what changed and deletes what is gone), with two named vectors, ``pooled`` [d]
and ``regions`` (the image's valid regions as a multi-vector compared by MAX_SIM, kept as
int8 by Qdrant's scalar quantisation), and a payload of the image id, the detected label names
and every folder the image lies under (the ``--label`` and ``--under`` filters). A text query
is one call: a prefetch of the pooled nearest neighbours, then MaxSim of the query's words,
each scaled by its prominence, against their regions (the sum over words of prominence times
the best cosine, as the local MaxSim pass).

``url``: ``http(s)://host:port`` for a server or cluster, ``:memory:`` or a folder for the
client's local mode (no server; what CI tests).
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from cpfean.index.format import IndexFormatError

POOLED, REGIONS = "pooled", "regions"
_NAMESPACE = uuid.UUID("6b3c51a4-5d0e-4f5b-9a39-8f0d1c2e7a10")  # point ids of image ids


class EngineError(IndexFormatError):
    """The engine cannot be reached, or its collection does not mirror this index."""


def point_id(image_id: str) -> str:
    """The point of an image: a UUID derived from its id (the same in every build)."""
    return str(uuid.uuid5(_NAMESPACE, image_id))


def folders_of(image_id: str) -> list[str]:
    """Every folder an image lies under: "a/b/c.jpg" -> ["a", "a/b"]."""
    parts = image_id.split("/")[:-1]
    return ["/".join(parts[: k + 1]) for k in range(len(parts))]


def _client(url: str) -> Any:
    try:
        from qdrant_client import QdrantClient
    except ImportError as e:  # pragma: no cover - qdrant-client is in requirements.txt
        raise EngineError(f"the qdrant engine needs qdrant-client: {e}") from None
    if url.startswith(("http://", "https://")):
        # the client's version probe runs in a thread and warns when the server does not
        # answer; check() then names the unreachable server in one line, so the warning goes
        warnings.filterwarnings("ignore", message="Failed to obtain server version")
        return QdrantClient(url=url, timeout=60)
    if url == ":memory:":
        return QdrantClient(":memory:")
    return QdrantClient(path=url)


def _unreachable(error: Exception) -> bool:
    """Whether a client call failed in transport (no server, refused, timed out) rather than
    with an answer of the server."""
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException

    return isinstance(error, (ResponseHandlingException, httpx.TransportError, ConnectionError))


def _cause(error: BaseException) -> str:
    """The innermost error's text: the client wraps the transport's."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class QdrantStage:
    """The candidates of text queries from a Qdrant collection mirroring an index."""

    def __init__(self, url: str, collection: str, client: Any = None):
        from qdrant_client import models

        self.url, self.collection, self.models = url, collection, models
        self.client = client if client is not None else _client(url)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------------------ writing
    def write(
        self, index: Any, batch: int = 256, log: Callable[[str], None] = lambda s: None
    ) -> dict[str, int]:
        """Bring the collection in line with ``index``: created when missing, points of new
        or changed images upserted (a changed record has another digest), points of images
        gone deleted. Returns {"upserted", "deleted", "kept"}."""
        try:
            return self._write(index, batch, log)
        except EngineError:
            raise
        except Exception as e:  # connection, timeout and server errors alike: one line
            raise EngineError(f"qdrant at {self.url}: {type(e).__name__}: {e}") from None

    def _write(self, index: Any, batch: int, log: Callable[[str], None]) -> dict[str, int]:
        m = self.models
        dim = int(index.pooled.shape[1])
        if not self.client.collection_exists(self.collection):
            self.client.create_collection(
                self.collection,
                vectors_config={
                    POOLED: m.VectorParams(size=dim, distance=m.Distance.DOT),
                    REGIONS: m.VectorParams(
                        size=dim,
                        distance=m.Distance.DOT,
                        multivector_config=m.MultiVectorConfig(
                            comparator=m.MultiVectorComparator.MAX_SIM
                        ),
                        on_disk=True,
                        hnsw_config=m.HnswConfigDiff(m=0),  # only re-scores the prefetched
                    ),
                },
                quantization_config=m.ScalarQuantization(
                    scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8, always_ram=True)
                ),
            )
            if self.url.startswith(("http://", "https://")):  # local mode has no such index
                for key in ("labels", "folders"):
                    self.client.create_payload_index(
                        self.collection, key, field_schema=m.PayloadSchemaType.KEYWORD
                    )
        elif self._dim() != dim:
            raise EngineError(
                f"collection {self.collection!r} at {self.url} holds {self._dim()}-d vectors, "
                f"the index {dim}-d; name another --collection"
            )
        stored = dict(self._stored())
        digests = index.digests()
        pairs = enumerate(zip(index.image_ids, digests, strict=True))
        wanted = {point_id(i): (row, d) for row, (i, d) in pairs}
        gone = [p for p in stored if p not in wanted]
        todo = np.array(
            sorted(row for p, (row, d) in wanted.items() if stored.get(p) != d or d is None),
            dtype=np.int64,
        )
        for start in range(0, len(todo), batch):
            rows = todo[start : start + batch]
            self.client.upsert(self.collection, self._points(index, rows, digests), wait=True)
            log(f"qdrant: {start + len(rows)} of {len(todo)} points written")
        for start in range(0, len(gone), 1024):
            selector = m.PointIdsList(points=gone[start : start + 1024])
            self.client.delete(self.collection, points_selector=selector, wait=True)
        return {"upserted": len(todo), "deleted": len(gone), "kept": len(wanted) - len(todo)}

    def _dim(self) -> int:
        info = self.client.get_collection(self.collection)
        return int(info.config.params.vectors[POOLED].size)

    def _stored(self) -> Iterator[tuple[str, str | None]]:
        """(point id, digest) of every point in the collection."""
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.collection, limit=1024, offset=offset, with_payload=["digest"]
            )
            for p in points:
                yield str(p.id), (p.payload or {}).get("digest")
            if offset is None:
                return

    def _points(self, index: Any, rows: np.ndarray, digests: list[str | None]) -> list:
        emb = index.images(rows)
        mask = emb.mask.bool().numpy()
        regions = emb.regions.float().numpy()
        pooled = np.asarray(index.pooled[rows], dtype=np.float32)
        names = index.label_names
        points = []
        for k, row in enumerate(rows.tolist()):
            image_id = index.image_ids[row]
            labels = sorted(
                {names[int(x)] for x in np.asarray(index.labels[row]) if 0 <= x < len(names)}
            )
            valid = regions[k][mask[k]]
            if not len(valid):  # an image without regions: its pooled vector stands in
                valid = pooled[k : k + 1]
            points.append(
                self.models.PointStruct(
                    id=point_id(image_id),
                    vector={POOLED: pooled[k].tolist(), REGIONS: valid.tolist()},
                    payload={
                        "image_id": image_id,
                        "labels": labels,
                        "folders": folders_of(image_id),
                        "digest": digests[row],
                    },
                )
            )
        return points

    # ------------------------------------------------------------------------------ reading
    def check(self, index: Any) -> None:
        """Raise EngineError unless the collection holds exactly this index's images."""
        try:
            count = self.client.count(self.collection, exact=True).count
        except Exception as e:  # the client raises several kinds for a missing collection
            if _unreachable(e):
                raise EngineError(
                    f"cannot reach qdrant at {self.url}: {_cause(e)}; is the server running?"
                ) from None
            raise EngineError(
                f"no collection {self.collection!r} at {self.url} ({type(e).__name__}); write "
                "it with pipelines.index --engine qdrant"
            ) from None
        if count != index.count:
            raise EngineError(
                f"collection {self.collection!r} at {self.url} holds {count} images, the index "
                f"{index.count}; re-run pipelines.index --engine qdrant"
            )

    def candidates(
        self,
        pooled: np.ndarray,
        words: np.ndarray,
        weights: np.ndarray,
        n: int,
        widened: int,
        label: str | None = None,
        under: str | None = None,
    ) -> list[str]:
        """Image ids of the ``n`` best by MaxSim among the ``widened`` pooled neighbours,
        within the images with a region labelled ``label`` and under folder ``under``."""
        m = self.models
        must = []
        if label:
            must.append(m.FieldCondition(key="labels", match=m.MatchValue(value=label)))
        if under:
            folder = under.strip("/")
            must.append(m.FieldCondition(key="folders", match=m.MatchValue(value=folder)))
        where = m.Filter(must=must) if must else None
        scaled = (np.asarray(words, np.float32) * np.asarray(weights, np.float32)[:, None]).tolist()
        found = self.client.query_points(
            self.collection,
            prefetch=m.Prefetch(
                query=np.asarray(pooled, np.float32).tolist(),
                using=POOLED,
                limit=widened,
                filter=where,
            ),
            query=scaled,
            using=REGIONS,
            limit=n,
            query_filter=where,
            with_payload=["image_id"],
        )
        return [p.payload["image_id"] for p in found.points]
