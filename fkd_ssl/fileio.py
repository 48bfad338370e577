"""Files written whole or not at all: one atomic write for every file the project produces.

A temporary file beside the target is flushed and renamed over it; a full or read-only disk is one
:class:`~fkd_ssl.errors.OutputError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, writing


def tmp_name(path: Path) -> Path:
    """The temporary name a write of ``path`` uses (unique per host and process)."""
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}-{os.getpid()}")


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
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path (keeping ``path``'s suffix) to write to; on success it replaces ``path``."""
    path = Path(path)
    tmp = tmp_name(path)
    tmp = tmp.with_name(tmp.name + path.suffix) if path.suffix else tmp
    try:
        with writing(path):
            yield tmp
            if fsync and tmp.exists():
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, exclusive: bool = False, fsync: bool = True) -> bool:
    """Write ``data`` to ``path`` via a temporary file, fsync (unless ``fsync`` is False) and rename.
    With ``exclusive`` the file is only created if absent; returns whether this call created it."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with writing(path):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError:  # a filesystem without hard links: create-if-absent, not race-free
                    if path.exists():
                        return False
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
        return True
    finally:
        if tmp.exists():
            tmp.unlink()


def canonical_json(obj: Any) -> str:
    """The one text form of the JSON files the project writes (sorted keys, fixed indent)."""
    return json.dumps(obj, sort_keys=True, indent=1, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any, exclusive: bool = False) -> bool:
    return write_bytes_atomic(path, canonical_json(obj).encode(), exclusive=exclusive)


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
