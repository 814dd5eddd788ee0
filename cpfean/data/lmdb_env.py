"""The LMDB side of a region store: the data file checked before it is mapped, one env per
store and process (shared by its readers and writer), the writer's lock (``cpfean.data.
region_store`` owns the layout of what is stored)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import lmdb

from cpfean.data.region_record import RegionStoreError
from cpfean.fileio import WriterLock

_MAX_MAP_SIZE = 1 << 44
_LOCK_NAME = "writer.lock"
# LMDB's meta page (64-bit build): magic u32 at 16, page size u32 at 40 (the free DB's md_pad),
# last used page u64 at 136, transaction id u64 at 144; meta pages 0 and 1 alternate.
_LMDB_MAGIC, _LMDB_META = 0xBEEFC0DE, struct.Struct("<16xI20xI92xQQ")
# LMDB allows one env per store and process, so readers and a writer in one process share it:
# realpath -> (pid that opened it, env, read-only). Another pid's entry came through fork.
_ENVS: dict[str, tuple[int, lmdb.Environment, bool]] = {}


def check_lmdb_file(path: str | os.PathLike) -> None:
    """Raise RegionStoreError unless ``path/data.mdb`` is an LMDB file as long as its header
    says (mapping a truncated file and touching a missing page kills the process with SIGBUS).
    """
    data = Path(path) / "data.mdb"
    try:
        size = data.stat().st_size
        with open(data, "rb") as f:
            head = f.read(_LMDB_META.size)
            magic, psize, *_ = (
                _LMDB_META.unpack(head) if len(head) == _LMDB_META.size else (0, 0, 0, 0)
            )
            if magic != _LMDB_MAGIC or psize < 512 or psize & (psize - 1):
                raise RegionStoreError(
                    f"{data} is not an LMDB data file (a region store is an "
                    "LMDB directory written by pipelines.extract)"
                )
            f.seek(psize)
            second = f.read(_LMDB_META.size)
    except OSError as e:
        raise RegionStoreError(f"cannot read region store {path}: {e.strerror or e}") from None
    metas = [_LMDB_META.unpack(head)]
    if len(second) == _LMDB_META.size and _LMDB_META.unpack(second)[0] == _LMDB_MAGIC:
        metas.append(_LMDB_META.unpack(second))
    _, _, last_page, _ = max(metas, key=lambda m: m[3])  # the newer transaction's meta
    need = (last_page + 1) * psize
    if size < need:
        raise RegionStoreError(
            f"region store {path} is truncated: data.mdb has {size} bytes, its header needs {need}"
        )


def _drop_env(key: str) -> None:
    """Close and forget this process's env for a store (inherited ones too: py-lmdb counts them
    as open in a forked child until closed, and closing touches only the child's copy)."""
    _, env, _ = _ENVS.pop(key, (0, None, True))
    if env is not None:
        env.close()


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def store_lock(path: str | Path) -> WriterLock:
    """The lock a store's one writer holds (``is_held_elsewhere`` / ``holder`` to ask)."""
    return WriterLock(Path(path) / _LOCK_NAME, f"region store {path}")


def _open_reader(key: str) -> lmdb.Environment:
    """A read-only env registered in LMDB's reader table (a writer then keeps the pages it
    reads); in a folder this process cannot write, an unregistered one, refused while a writer
    holds the store."""
    check_lmdb_file(key)
    options = dict(subdir=True, readonly=True, readahead=False, meminit=False, max_dbs=0)
    try:
        return lmdb.open(key, lock=True, **options)
    except lmdb.Error:
        pass
    lock = store_lock(key)
    if lock.is_held_elsewhere():
        raise RegionStoreError(
            f"region store {key} is being written by {lock.holder()} and "
            "its folder is read-only here; read it when the writer is done"
        )
    try:
        return lmdb.open(key, lock=False, **options)
    except lmdb.Error as e:
        raise RegionStoreError(f"cannot open region store {key}: {e}") from None


def _read_env(path: Path) -> lmdb.Environment:
    """This process's env for the store at `path`: the one already open (a writer's, or a
    reader's) or a new read-only one."""
    key = os.path.realpath(path)
    pid, env, _ = _ENVS.get(key, (0, None, True))
    if env is None or pid != os.getpid():
        _drop_env(key)
        env = _open_reader(key)
        _ENVS[key] = (os.getpid(), env, True)
    return env


def _begin(path: Path) -> lmdb.Transaction:
    """A read transaction on the store at `path`, following the map when another process grew
    it since this env was opened."""
    env = _read_env(path)
    try:
        return env.begin()
    except lmdb.MapResizedError:
        env.set_mapsize(0)  # adopt the size the writer set
        return env.begin()
