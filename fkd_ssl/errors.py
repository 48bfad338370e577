"""User-facing error types: a one-line message naming the file or flag at fault.

:func:`fkd_ssl.cli.run_main` prints ``error: <message>`` with exit code 2; anything else is a bug.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class FKDError(Exception):
    """Base class for errors caused by user input."""


class DataError(FKDError):
    """A dataset spec, path or file is missing, empty or unreadable."""


class CheckpointError(FKDError):
    """A checkpoint is missing, truncated, of the wrong kind or does not match."""


class ConfigError(FKDError):
    """A flag or config value is invalid or conflicts with an existing run."""


class OutputError(FKDError):
    """An output file cannot be written: the disk is full, read-only, or not ours to write."""


#: errno values that say the output cannot be written (not a bug): full disk or quota, file too
#: large, read-only filesystem, no permission
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError of :data:`WRITE_ERRNOS` raised while writing ``path`` (also safetensors'
    wrapped I/O errors) into an :class:`OutputError` naming ``path``; anything else passes."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    except Exception as e:  # safetensors reports I/O errors as SafetensorError("... (os error N) ...")
        if type(e).__name__ != "SafetensorError":
            raise
        code = next((c for c in WRITE_ERRNOS if f"(os error {c})" in str(e)), None)
        if code is None:
            raise
        raise OutputError(f"cannot write {path}: {os.strerror(code)}") from e


def prepare_out_dir(out: str | os.PathLike, flag: str = "--out", error: type[FKDError] = ConfigError) -> Path:
    """Create a folder a flag names; ``error`` naming the flag if it is a file or not writable."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{flag} {path}: cannot create it ({e.strerror})") from e
    if not os.access(path, os.W_OK):
        raise error(f"{flag} {path} is not writable")
    return path
