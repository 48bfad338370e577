"""Files written whole or not at all: one atomic write for every file the project produces.

A temporary file beside the target is flushed and renamed over it; a full or read-only disk is one
:class:`~fkd_ssl.errors.OutputError` naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, writing


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path (unique per host and process, keeping ``path``'s suffix) to write to; on
    success it replaces ``path``.  With ``exclusive`` it only creates an absent ``path`` (else FileExistsError)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{socket.gethostname()}-{os.getpid()}{path.suffix}")
    try:
        with writing(path):
            yield tmp
            if fsync and tmp.exists():
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            if not exclusive:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # raises FileExistsError
                except OSError as e:  # a filesystem without hard links: create-if-absent, not race-free
                    if isinstance(e, FileExistsError) or path.exists():
                        raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
                    os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, exclusive: bool = False, fsync: bool = True) -> bool:
    """Write ``data`` to ``path`` by :func:`atomic_path`; returns whether it was written (``exclusive``: created)."""
    try:
        with atomic_path(path, fsync, exclusive) as tmp:
            tmp.write_bytes(data)
    except FileExistsError:
        return False
    return True


def write_json_atomic(path: str | os.PathLike, obj: Any, exclusive: bool = False) -> bool:
    """:func:`write_bytes_atomic` of ``obj`` in the one text form of the project's JSON (sorted keys, indent 1)."""
    return write_bytes_atomic(path, (json.dumps(obj, sort_keys=True, indent=1, allow_nan=False) + "\n").encode(),
                              exclusive=exclusive)


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    write_bytes_atomic(path, text.encode(), fsync=fsync)


def read_json(path: Path, what: str = "store file") -> Any:
    """Parse a JSON file; DataError naming the file if missing or corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} is corrupt ({e})") from None


def file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    """Full sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
