"""On-disk layout of a target store: file names, the record dtype, atomic JSON and checksums.

The files of a store and what each holds: docs/store.md.  Shard ``s`` holds images
``[s * shard_size, min((s + 1) * shard_size, N))``.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .geometry import PARAMS, Geometry
from ..fileio import atomic_path, file_sha256, read_json, write_bytes_atomic, write_json_atomic  # noqa: F401

FORMAT = "fkd_ssl.target_store"
VERSION = 2  # 2: the view geometry has a form (geometry.py); version 1 stores (float32 geometry) still read
READABLE = (1, 2)

HEADER = "header.json"
MANIFEST = "manifest.json"
LOG = "log.jsonl"
PARAMS_FIELD = PARAMS
DONE_NOT, DONE_WRITTEN, DONE_SKIPPED = 0, 1, 2

# every name a store writes (overwrite=True deletes exactly these, nothing else)
_STORE_FILE = re.compile(
    r"^(header\.json|manifest\.json|log\.jsonl|codec\.[A-Za-z0-9_-]+\.npy"
    r"|shard-\d{5,}\.(records\.npy|done\.npy|images\.npy|skipped\.json|sha256\.json))(\.tmp[.\w-]*)?$"
)


SHARD_FILES = ("records.npy", "done.npy", "skipped.json", "images.npy")  # a shard's files; "sha256.json" checksums them


def shard_file(s: int, kind: str) -> str:
    """``shard-00007.<kind>``: one of :data:`SHARD_FILES` or ``sha256.json``."""
    return f"shard-{s:05d}.{kind}"


def codec_state_file(key: str) -> str:
    return f"codec.{key}.npy"


def num_shards(num_images: int, shard_size: int) -> int:
    return -(-num_images // shard_size)


def shard_range(s: int, num_images: int, shard_size: int) -> tuple[int, int]:
    """Global image indices ``[start, stop)`` of shard ``s``."""
    return s * shard_size, min((s + 1) * shard_size, num_images)


def record_dtype(param_dim: int, fields: dict[str, tuple[str, tuple[int, ...]]]) -> np.dtype:
    """One view's record: ``params`` float32 (P,) then the codec fields, packed (no padding)."""
    if PARAMS_FIELD in fields:
        raise ConfigError(f"codec field name {PARAMS_FIELD!r} is reserved for the geometry")
    return np.dtype([(PARAMS_FIELD, "<f4", (param_dim,))] + [(k, dt, shape) for k, (dt, shape) in fields.items()])


def stored_dtype(geometry: Geometry, fields: dict[str, tuple[str, tuple[int, ...]]]) -> np.dtype:
    """One view's record as stored: the geometry's fields (none for ``replay``) then the codec's."""
    record_dtype(geometry.param_dim, fields)  # the reserved name
    both = {**geometry.fields(), **fields}
    if len(both) < len(geometry.fields()) + len(fields):
        raise ConfigError(f"codec field names {sorted(fields)} collide with the geometry's {sorted(geometry.fields())}")
    return np.dtype([(k, dt, shape) for k, (dt, shape) in both.items()])


def dtype_to_json(dt: np.dtype) -> list:
    return [[name, dt.fields[name][0].base.str, list(dt.fields[name][0].shape)] for name in dt.names]


def is_store_file(name: str) -> bool:
    return bool(_STORE_FILE.match(name))


def is_tmp_file(name: str) -> bool:
    """A temporary file left by a store write that was killed before its rename."""
    return is_store_file(name) and ".tmp." in name


def normalise(obj: Any, what: str) -> Any:
    """``obj`` as it will read back from JSON (tuples -> lists); ConfigError if not JSON-able."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be plain JSON (str/int/float/bool/None/list/dict): {e}") from None


def file_entry(path: Path) -> dict:
    """``{"bytes": size, "sha256": digest}`` of one file."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def check_files(path: Path, entry: dict, source: str, sha256: bool = False) -> None:
    """DataError naming the first file of a shard's checksum ``entry`` that is missing or whose size (with
    ``sha256`` also digest) differs from what ``source`` records."""
    for name, meta in entry["files"].items():
        f = path / name
        if not f.exists():
            raise DataError(f"store file {f} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise DataError(f"store file {f} is truncated or altered ({f.stat().st_size} bytes, {source} says "
                            f"{meta['bytes']})")
        if sha256 and file_sha256(f) != meta["sha256"]:
            raise DataError(f"store file {f} is corrupt (sha256 differs from {source})")


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (recursing into dicts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(p)
            else:
                out.extend(diff_keys(old[k], new[k], p))
        return out
    return [] if old == new else [prefix or "(value)"]


def get_dotted(obj: Any, dotted: str) -> Any:
    """The value at a dotted path of nested dicts (as :func:`diff_keys` names it), or None."""
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def open_npy(path: Path, mode: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """Memory-map an existing ``.npy`` and check its dtype and shape (DataError naming the file
    if it is missing, truncated or not what the store expects)."""
    try:
        mm = np.lib.format.open_memmap(path, mode=mode)
    except FileNotFoundError:
        raise DataError(f"store file {path} is missing") from None
    except (ValueError, OSError) as e:
        raise DataError(f"store file {path} is truncated or not a valid .npy array ({e})") from None
    if mm.dtype != dtype or tuple(mm.shape) != tuple(shape):
        raise DataError(f"store file {path} holds {mm.dtype} {mm.shape}, expected {dtype} {tuple(shape)}")
    return mm


def create_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Create a zero-filled ``.npy`` atomically, its disk blocks reserved (a new memmap is sparse): a full disk
    is then an OSError here, not a SIGBUS at a later write through the map."""
    with atomic_path(path) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
        if hasattr(os, "posix_fallocate"):
            with open(tmp, "rb+") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise

