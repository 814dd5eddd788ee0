"""Synthetic encoded galleries shared by the retrieval and serving benchmarks: concept
vectors arranged in scene templates (the retrieval benchmark's docstring has the recipe),
written as a real index through ``cpfean.index.build_index``, with their exact top-k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cpfean import first_stage

R = 36
# text queries whose encoding the benchmarks time (the synthetic galleries have no words)
QUERIES = [
    "a dog on grass",
    "a red car on the road",
    "a small blue ball left of a box",
    "a green tree near a house",
    "a yellow cup on a table",
    "two stars and a moon",
    "a large red ball to the left of a blue box",
    "a purple heart",
    "a white cloud",
    "an orange fish below a flower",
]


class SyntheticGallery:
    """Deterministic encoded gallery of ``n`` images in ``d`` dimensions.

    Per image (vectorised over the gallery): ``objs`` [N, 7] concept ids (main objects first,
    then clutter; -1 = unused), ``slot`` [N, R] index into ``objs`` per region slot (-1 =
    padding), ``noise_mean`` [N, d] float16, the mean of the image's region noise. Region
    noise of image i is drawn from ``default_rng([seed, 3, i])`` and re-centred on
    ``noise_mean[i]``, so regions can be regenerated for any id alone and their mean is
    exactly ``pooled_raw(i)``.
    """

    def __init__(
        self,
        n: int,
        d: int,
        *,
        seed: int = 0,
        n_concepts: int = 1000,
        per_template: int = 50,
        sigma: float = 1.0,
        chunk: int = 20000,
    ):
        self.n, self.d, self.seed, self.sigma = n, d, seed, sigma
        rng = np.random.default_rng([seed, 1])
        self.concepts = first_stage.normalise(rng.normal(size=(n_concepts, d)))
        # scene templates: ~per_template images share 3 main concepts (each kept w.p. 0.85)
        self.templates = rng.integers(0, n_concepts, (max(20, n // per_template), 3))
        self.template = rng.integers(0, len(self.templates), n)
        objs = rng.integers(0, n_concepts, (n, 7)).astype(np.int32)
        objs[:, :3] = self.templates[self.template]
        used = np.ones((n, 7), bool)
        used[:, :3] = rng.random((n, 3)) < 0.85
        used[:, 0] |= ~used[:, :3].any(1)
        used[:, 3] = rng.random(n) < 0.3  # an extra main object
        n_clutter = rng.integers(1, 4, n)
        used[:, 4:] = np.arange(3) < n_clutter[:, None]
        self.objs = np.where(used, objs, -1)
        k = np.arange(7)
        weights = np.where(used & (k < 4), rng.uniform(1, 3, (n, 7)), 0.0)
        weights += np.where(used & (k >= 4), 1.0 / n_clutter[:, None], 0.0)
        cum = np.cumsum(weights, axis=1)
        cum /= cum[:, -1:]  # exactly 1.0 at the end: u in [0, 1) never passes it
        u = rng.random((n, R))
        slot = (u[..., None] > cum[:, None, :]).sum(-1)
        n_valid = rng.integers(10, R + 1, n)
        self.slot = np.where(np.arange(R) < n_valid[:, None], slot, -1).astype(np.int8)
        self.noise_mean = np.empty((n, d), np.float16)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            g = np.random.default_rng([seed, 2, start])
            scale = 1.0 / np.sqrt(d * n_valid[start:stop, None])
            self.noise_mean[start:stop] = (
                g.standard_normal((stop - start, d), dtype=np.float32) * scale
            )

    def _slot_concepts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot = self.slot[rows].astype(np.int64)
        mask = slot >= 0
        ids = np.take_along_axis(self.objs[rows], np.maximum(slot, 0), axis=1)
        return ids, mask

    def pooled_raw(self, rows: np.ndarray) -> np.ndarray:
        """[n, d] mean of the valid regions of ``rows`` (before normalising regions)."""
        slot, objs = self.slot[rows], self.objs[rows]
        counts = (slot >= 0).sum(1)
        out = self.sigma * self.noise_mean[rows].astype(np.float32)
        for j in range(7):  # sum over slots via the <= 7 concepts of each image
            share = ((slot == j).sum(1) / counts).astype(np.float32)
            out += share[:, None] * self.concepts[np.maximum(objs[:, j], 0)]
        return out

    def regions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit-norm region embeddings [n, R, d] float32 (padding zero) and mask [n, R]."""
        ids, mask = self._slot_concepts(rows)
        out = self.concepts[ids]  # (n, R, d)
        for k, i in enumerate(rows):
            m = int(mask[k].sum())
            z = np.random.default_rng([self.seed, 3, int(i)]).standard_normal(
                (m, self.d), dtype=np.float32
            ) / np.sqrt(self.d)
            noise = self.noise_mean[i].astype(np.float32) + (z - z.mean(0))
            out[k, :m] += self.sigma * noise
            out[k, m:] = 0.0
        return first_stage.normalise(out.reshape(-1, self.d)).reshape(out.shape), mask

    def queries(self, q: int, seed: int = 4) -> list[np.ndarray]:
        """``q`` queries, each [L, d] unit-norm word vectors (L = 6 or 8)."""
        rng = np.random.default_rng([self.seed, seed])
        out = []
        for _ in range(q):
            main = self.templates[self.template[int(rng.integers(self.n))]]
            picked = rng.choice(main, size=int(rng.integers(2, 4)), replace=False)
            words = [
                self.concepts[c] + rng.normal(0, 0.7 / np.sqrt(self.d), self.d)
                for c in picked
                for _ in range(2)
            ]
            words += list(rng.normal(size=(2, self.d)))
            out.append(first_stage.normalise(np.array(words)))
        return out


class GivenRegions(torch.nn.Module):
    """A region encoder for a gallery that is already encoded: the features are the unit-norm
    region embeddings, so ``CPFEAN.encode_images`` only adds the Gram matrices and gate terms."""

    def forward(self, regions) -> torch.Tensor:
        return torch.where(regions.mask[..., None], regions.features, 0)


class SyntheticStore:
    """The gallery seen as a region store by ``build_index``: a record's features are its
    region embeddings (with a ``GivenRegions`` encoder), with no geometry."""

    def __init__(self, gal: SyntheticGallery, path: Path):
        self.gal, self.path, self.meta = gal, path, {"label_names": []}

    def ids(self) -> list[str]:
        return [f"{i:07d}" for i in range(self.gal.n)]

    def fingerprint(self) -> str:
        return f"synthetic gallery n={self.gal.n} d={self.gal.d} seed={self.gal.seed}"

    def __getitem__(self, image_id: str):
        from cpfean.data.region_store import RegionRecord

        regions, mask = self.gal.regions(np.array([int(image_id)]))
        return RegionRecord(
            features=regions[0],
            boxes=np.zeros((R, 4), np.float32),
            labels=np.full(R, -1),
            scores=np.zeros(R, np.float32),
            image_hw=(0, 0),
            num_valid=int(mask[0].sum()),
        )


def text_embeddings(model, words: list[np.ndarray]):
    """The model's TextEmbeddings of given unit-norm word vectors (one [L, d] per query)."""
    size = max(len(w) for w in words)
    w = torch.zeros(len(words), size, words[0].shape[1])
    mask = torch.zeros(len(words), size, dtype=torch.bool)
    for k, x in enumerate(words):
        w[k, : len(x)], mask[k, : len(x)] = torch.from_numpy(x), True
    return model.text_embeddings(w, mask, torch.zeros_like(mask, dtype=torch.long))


@torch.no_grad()
def write_index(model, gal: SyntheticGallery, out: Path, *, codec: str | None = None):
    """Write ``gal`` as a cpfean index at ``out`` through ``cpfean.index.build_index`` (kept
    when one of the same gallery and codec is there already); returns its `IndexBuild`."""
    from cpfean.index import build_index

    return build_index(
        model,
        SyntheticStore(gal, out.with_name("synthetic-store")),
        out,
        checkpoint={"path": "synthetic", "sha256": "0" * 64},
        config={},
        shard_size=10_000,
        batch_size=500,
        progress=True,
        codec=codec,
    )


@torch.no_grad()
def exact_top_k(model, gal: SyntheticGallery, txt, top_k: int, block: int = 2000) -> np.ndarray:
    """The exhaustive top-k rows [Q, k] of the queries ``txt`` over the gallery's exact values
    (regions regenerated from their ids in float32): the ground truth of a compressed index."""
    best = [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(txt))]
    for start in range(0, gal.n, block):
        rows = np.arange(start, min(start + block, gal.n))
        regions, mask = gal.regions(rows)
        emb = model.image_embeddings(torch.from_numpy(regions), torch.from_numpy(mask))
        sims = model.score(emb, txt, image_chunk=block, text_chunk=len(txt)).numpy()
        for q in range(len(txt)):
            r, s = best[q]
            best[q] = first_stage.top_k(
                np.concatenate([s, sims[:, q]]), np.concatenate([r, rows]), top_k
            )
    return np.stack([r for r, _ in best])
