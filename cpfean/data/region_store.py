"""The region store (an LMDB directory): the contract between detector and matching stages.

Written only through `RegionWriter`, read only through `RegionStore`; no other file knows the
layout. Keys: ``__meta__`` -> UTF-8 JSON (see `RegionWriter`); an image id (path relative to the
images root, POSIX separators, UTF-8) -> a record's bytes (`cpfean.data.region_record`); and,
written in the same transaction, NUL + the id -> the record's source as JSON: ``digest`` of the
record's bytes, and the image file's ``size`` and ``mtime_ns`` when it was read, which is how a
re-run of the extractor knows a changed file and an index update knows a changed record.
Never pickle: stores are shared, unpickling runs code.

One writer at a time holds ``writer.lock`` in the store's folder; a second one is refused with
the holder's name. Readers register in LMDB's reader table where the folder is writable (so a
concurrent writer never reuses pages they read) and follow the map as it grows; in a read-only
folder they refuse a store that is being written. The data file is checked against its LMDB
header before it is mapped, so a truncated store is an error, not a SIGBUS.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lmdb

from cpfean.data.lmdb_env import (
    _ENVS,
    _LOCK_NAME,
    _MAX_MAP_SIZE,
    _begin,
    _drop_env,
    _is_utf8,
    check_lmdb_file,
    store_lock,
)
from cpfean.data.region_record import (
    META_KEY,
    NUM_REGIONS,
    SCHEMA_VERSION,
    SOURCE_PREFIX,
    RegionRecord,
    RegionStoreError,
    _decode,
    _encode,
    _key,
    image_id_problem,
)
from cpfean.data.store_meta import (
    _IDENTITY_KEYS,
    _check_compatible,
    _check_fits,
    _normalise_meta,
    _parse_meta,
)
from cpfean.fileio import LockedError

__all__ = [
    "META_KEY",
    "NUM_REGIONS",
    "SCHEMA_VERSION",
    "RegionRecord",
    "RegionStore",
    "RegionStoreError",
    "RegionWriter",
    "check_lmdb_file",
    "image_id_problem",
    "merge_stores",
    "record_digest",
    "store_lock",
]


def record_digest(value: bytes | memoryview) -> str:
    """The digest of a record's stored bytes (an index update compares these)."""
    return hashlib.blake2b(value, digest_size=16).hexdigest()


def _source_key(image_id: str) -> bytes:
    return SOURCE_PREFIX + image_id.encode("utf-8")


def _source_value(value: bytes, source: dict | None) -> bytes:
    """A record's companion: the digest of its bytes and where it came from (file size and
    modification time in ns, when known)."""
    entry = {"digest": record_digest(value)}
    for key in ("size", "mtime_ns"):
        if source and source.get(key) is not None:
            entry[key] = int(source[key])
    return json.dumps(entry).encode("utf-8")


class RegionWriter:
    """Writes `RegionRecord`s into a region store (a directory), batched, resumably.

    Reopening an existing store resumes it: `meta` must agree with the stored one on
    `_IDENTITY_KEYS`, else RegionStoreError names the differing key. `meta` holds feature_dim,
    label_names and num_regions (slots per record, 1..1000; default 36); the writer fills
    schema_version, feature_dtype, created and defaults detector, thresholds ({}), has_boxes
    (True), has_labels (bool(label_names)).
    Commits every `commit_every` puts, on `flush` and `close` (also on leaving a ``with`` block
    by an error): a killed run keeps only whole records. One writer per store at a time."""

    def __init__(
        self,
        path: str | os.PathLike,
        meta: dict,
        *,
        commit_every: int = 64,
        map_size: int = 1 << 36,
    ):
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        self.path, self.commit_every, given = Path(path), int(commit_every), _normalise_meta(meta)
        if self.path.exists() and not self.path.is_dir():
            raise RegionStoreError(f"{self.path} is a file, not a region store directory")
        if self.path.is_dir() and not (self.path / "data.mdb").exists():
            others = sorted(p.name for p in self.path.iterdir() if p.name != _LOCK_NAME)
            if others:
                raise RegionStoreError(
                    f"{self.path} is a folder that is not a region store "
                    f"(it holds {others[0]!r}); choose a new --out"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self._key = os.path.realpath(self.path)
        pid, _, readonly = _ENVS.get(self._key, (0, None, True))
        if pid == os.getpid() and not readonly:
            raise RegionStoreError(f"a RegionWriter for {self.path} is already open")
        try:
            self._lock = store_lock(self.path).acquire()
        except LockedError as e:
            raise RegionStoreError(str(e)) from None
        self._env: lmdb.Environment | None = None
        self._pending: dict[str, tuple[bytes, bytes]] = {}  # id -> (record, source)
        try:
            if (self.path / "data.mdb").exists():
                check_lmdb_file(self.path)
            _drop_env(self._key)  # a reader's env in this process; readers then share ours
            try:
                self._env = lmdb.open(
                    self._key, subdir=True, map_size=map_size, meminit=False, max_dbs=0
                )
            except lmdb.Error as e:
                raise RegionStoreError(f"cannot open region store {self.path}: {e}") from None
            _ENVS[self._key] = (os.getpid(), self._env, False)
            with self._env.begin() as txn:
                raw = txn.get(META_KEY.encode())
                keys = txn.cursor().iternext(keys=True, values=False)
                raw_keys = list(keys)
            if not all(_is_utf8(k) for k in raw_keys):
                raise RegionStoreError(f"{self.path} holds keys that are not UTF-8: not ours")
            self._done = {
                k.decode("utf-8") for k in raw_keys if not k.startswith(SOURCE_PREFIX)
            } - {META_KEY}
            if raw is None:
                if self._done:
                    raise RegionStoreError(f"{self.path} has entries but no {META_KEY}: not ours")
                self._meta = given
                meta_bytes = json.dumps(given).encode("utf-8")
                self._transact(lambda txn: txn.put(META_KEY.encode(), meta_bytes))
            else:
                self._meta = _parse_meta(raw, self.path)
                _check_compatible(self._meta, given, f"reopening region store {self.path}")
        except BaseException:
            self._env = None
            _drop_env(self._key)
            self._lock.release()
            raise

    @property
    def meta(self) -> dict:
        """The store's meta (the stored one when resuming)."""
        return copy.deepcopy(self._meta)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._done or image_id in self._pending  # committed or pending

    def done_ids(self) -> set[str]:
        """Ids already written (committed or pending)."""
        return self._done | set(self._pending)

    def put(self, image_id: str, record: RegionRecord, source: dict | None = None) -> None:
        """Queue a record (committed every `commit_every` puts); raises on bad values.
        ``source``: the image file's ``size`` and ``mtime_ns`` as read (see the module)."""
        _key(image_id)
        if image_id in self:
            raise RegionStoreError(
                f"image {image_id!r} is already in {self.path}; skip written "
                "ids with `image_id in writer`"
            )
        _check_fits(image_id, record, self._meta)
        value = _encode(image_id, record)
        self._put_encoded(image_id, value, _source_value(value, source))

    def delete(self, image_ids: Iterable[str]) -> int:
        """Remove these records (and their sources) in one transaction; returns how many were
        there."""
        self.flush()
        gone = [i for i in image_ids if i in self._done]

        def drop(txn: lmdb.Transaction) -> None:
            for image_id in gone:
                txn.delete(_key(image_id))
                txn.delete(_source_key(image_id))

        self._transact(drop)
        self._done.difference_update(gone)
        return len(gone)

    def set_meta(self, **values: Any) -> None:
        """Change meta keys that are not the store's identity (the images root of a folder
        that moved, say)."""
        clash = sorted(set(values) & set(_IDENTITY_KEYS))
        if clash:
            raise RegionStoreError(f"meta key {clash[0]!r} is the store's identity; not changed")
        if all(self._meta.get(k) == v for k, v in values.items()):
            return
        self._meta.update(values)
        meta_bytes = json.dumps(self._meta).encode("utf-8")
        self._transact(lambda txn: txn.put(META_KEY.encode(), meta_bytes))

    def adopt_sources(self, sources: dict[str, dict]) -> None:
        """Record the source of records written before stores kept one (their digest from the
        stored bytes), in one transaction."""
        self.flush()

        def adopt(txn: lmdb.Transaction) -> None:
            for image_id, source in sources.items():
                value = txn.get(_key(image_id))
                if value is not None:
                    txn.put(_source_key(image_id), _source_value(value, source))

        self._transact(adopt)

    def flush(self) -> None:
        if self._pending:
            self._commit(self._pending)
            self._done.update(self._pending)
            self._pending = {}

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._env is not None:
            try:
                self.flush()
            finally:
                self._env = None
                _drop_env(self._key)
                self._lock.release()

    def __enter__(self) -> RegionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # whole records already put are committed even when exiting on an error

    def _put_encoded(self, image_id: str, value: bytes, source: bytes) -> None:
        if self._env is None:
            raise RuntimeError(f"RegionWriter for {self.path} is closed")
        self._pending[image_id] = (value, source)
        if len(self._pending) >= self.commit_every:
            self.flush()

    def _commit(self, items: dict[str, tuple[bytes, bytes]]) -> None:
        """Write `items` (each record with its source) in one transaction."""

        def put(txn: lmdb.Transaction) -> None:
            for image_id, (value, source) in items.items():
                txn.put(image_id.encode("utf-8"), value)
                txn.put(_source_key(image_id), source)

        self._transact(put)

    def _transact(self, work: Callable[[lmdb.Transaction], None]) -> None:
        """Run ``work`` in one write transaction, growing the (sparse, virtual) map when full."""
        assert self._env is not None
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    work(txn)
                return
            except lmdb.MapFullError:
                size = self._env.info()["map_size"]
                if size >= _MAX_MAP_SIZE:
                    raise
                self._env.set_mapsize(size * 2)


class RegionStore:
    """Read-only access to a region store; records are validated on read, errors name the id.

    The LMDB env is opened lazily (read-only, lock=False), once per process and store, and
    reopened on first use in a new process, so a store can go to DataLoader workers (fork or
    spawn): a pickle carries only the path. Do not read a store another process is writing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"no region store at {self.path} (a directory with data.mdb)")
        self._meta: dict | None = None

    def _stored_meta(self) -> dict:
        if self._meta is None:
            with _begin(self.path) as txn:
                raw = txn.get(META_KEY.encode())
            if raw is None:
                raise RegionStoreError(f"{self.path} has no {META_KEY}; not a region store")
            self._meta = _parse_meta(raw, self.path)
        return self._meta

    @property
    def meta(self) -> dict:
        """The parsed ``__meta__`` (a copy)."""
        return copy.deepcopy(self._stored_meta())

    def __len__(self) -> int:
        return len(self.ids())

    def fingerprint(self) -> str:
        """A digest that changes whenever the store's content does: its meta (creation time
        included, so a re-extracted store differs), entry count and last LMDB transaction."""
        meta = json.dumps(self._stored_meta(), sort_keys=True)
        with _begin(self.path) as txn:
            info = txn.id(), txn.stat()["entries"]
        return hashlib.sha256(f"{meta}|{info[0]}|{info[1]}".encode()).hexdigest()

    def ids(self) -> list[str]:
        """All image ids, sorted (``__meta__`` and the sources excluded)."""
        self._stored_meta()
        with _begin(self.path) as txn:
            cursor = txn.cursor()
            # the sources sort first (their NUL prefix): start past them
            found = cursor.set_range(bytes([SOURCE_PREFIX[0] + 1]))
            raw = [bytes(k) for k in cursor.iternext(keys=True, values=False)] if found else []
        try:
            keys = [k.decode("utf-8") for k in raw]
        except UnicodeDecodeError:
            bad = next(k for k in raw if not _is_utf8(k))
            raise RegionStoreError(
                f"region store {self.path} holds key {bad[:40]!r}, which is "
                "not UTF-8: not written by cpfean"
            ) from None
        return sorted(k for k in keys if k != META_KEY)

    def sources(self) -> dict[str, dict]:
        """Each image's source entry (``digest``, and ``size`` / ``mtime_ns`` of the file it
        was read from), for the records that have one (a store written before sources were
        kept has none)."""
        out: dict[str, dict] = {}
        with _begin(self.path) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(SOURCE_PREFIX):
                return out
            for key, value in cursor:
                if not key.startswith(SOURCE_PREFIX):
                    break
                try:
                    image_id = bytes(key[len(SOURCE_PREFIX) :]).decode("utf-8")
                    entry = json.loads(bytes(value).decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise RegionStoreError(
                        f"region store {self.path}: the source entry {bytes(key)[:40]!r} is "
                        "not UTF-8 JSON: not written by cpfean"
                    ) from None
                out[image_id] = entry
        return out

    def digests(self, image_ids: Sequence[str]) -> list[str]:
        """The digest of each record's bytes: from its source entry, else computed."""
        known = self.sources()
        out = []
        for image_id in image_ids:
            digest = known.get(image_id, {}).get("digest")
            if digest is None:
                raw = self._raw(image_id)
                if raw is None:
                    raise KeyError(f"image id {image_id!r} is not in region store {self.path}")
                digest = record_digest(raw)
            out.append(digest)
        return out

    def _raw(self, image_id: object) -> bytes | None:
        """The stored bytes of one record; None when absent (or not a valid id)."""
        try:
            key = _key(image_id)  # type: ignore[arg-type]
        except ValueError:
            return None
        with _begin(self.path) as txn:
            return txn.get(key)

    def _raw_source(self, image_id: str) -> bytes:
        """The stored source entry of one record (one made from its bytes when there is none)."""
        with _begin(self.path) as txn:
            source = txn.get(_source_key(image_id))
            value = None if source is not None else txn.get(_key(image_id))
        return bytes(source) if source is not None else _source_value(value or b"", None)

    def __contains__(self, image_id: object) -> bool:
        return self._raw(image_id) is not None

    def __getitem__(self, image_id: str) -> RegionRecord:
        """The record of one image; KeyError naming the id when it is not in the store."""
        buf = self._raw(image_id)
        if buf is None:
            raise KeyError(f"image id {image_id!r} is not in region store {self.path}")
        record = _decode(image_id, buf)
        _check_fits(image_id, record, self._stored_meta())
        return record

    def close(self) -> None:
        """Close this process's read-only env of the store (reopened lazily if used again)."""
        key = os.path.realpath(self.path)
        if _ENVS.get(key, (0, None, False))[2]:  # a writer's env stays open for the writer
            _drop_env(key)


def merge_stores(
    sources: Sequence[str | os.PathLike], dest: str | os.PathLike, *, commit_every: int = 64
) -> int:
    """Merge per-rank stores (identity meta must agree) into a new store at `dest`; returns
    its number of records. Records are validated and copied byte for byte; an id in several
    sources must have identical bytes in each. Written to ``{dest}.partial`` (replaced if left
    by an interrupted merge), renamed to `dest` (which must not exist) when whole."""
    dest = Path(dest)
    if not sources:
        raise ValueError("merge_stores needs at least one source store")
    if dest.exists():
        raise FileExistsError(f"{dest} exists; merge_stores writes a new store")
    stores = [RegionStore(s) for s in sources]
    try:
        first = stores[0].meta
        for store in stores[1:]:
            _check_compatible(first, store.meta, f"merging {store.path} with {stores[0].path}")
        meta = {
            **{k: v for k, v in first.items() if k != "created"},
            "merged_from": [str(s.path) for s in stores],
        }
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        origin: dict[str, int] = {}
        with RegionWriter(partial, meta, commit_every=commit_every) as writer:
            for i, store in enumerate(stores):
                for image_id in store.ids():
                    value = store._raw(image_id)
                    source = store._raw_source(image_id)
                    if image_id in origin:
                        other = stores[origin[image_id]]
                        if other._raw(image_id) != value:
                            raise RegionStoreError(
                                f"image {image_id!r} is in both {other.path} "
                                f"and {store.path} with different contents"
                            )
                    else:
                        _check_fits(image_id, _decode(image_id, value), writer._meta)
                        writer._put_encoded(image_id, value, source)
                        origin[image_id] = i
        os.replace(partial, dest)
    finally:
        for store in stores:
            store.close()
    return len(origin)
