"""A trained codec's state inside a store: ``codec.<key>-<sha16>.npy`` files (named by content)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from . import layout as L
from .codecs import Codec, array_sha256, codec_from_params, npy_bytes


def save_codec_state(path: Path, codec: Codec) -> dict[str, dict]:
    """Write ``codec.state_arrays()`` into store ``path``; returns {key: {"file", "sha256"}}."""
    out = {}
    for key, arr in codec.state_arrays().items():
        data = npy_bytes(arr)
        sha = array_sha256(arr)
        name = L.codec_state_file(f"{key}-{sha[:16]}")
        f = path / name
        if not L.write_bytes_atomic(f, data, exclusive=True) and L.file_sha256(f) != sha:
            # same digest prefix but other bytes: only a torn leftover of a killed creation
            L.write_bytes_atomic(f, data)
        out[key] = {"file": name, "sha256": sha}
    return out


def load_codec(path: Path, codec_meta: dict, into: Codec | None = None) -> Codec:
    """The store's codec (``codec_meta``: the header's entry) with its state loaded and checked,
    into ``into`` if given."""
    codec = into if into is not None else codec_from_params(codec_meta["name"], codec_meta["params"])
    files = codec_meta.get("state_files") or {}
    if not files:
        return codec
    arrays = {}
    for key, ref in files.items():
        f = path / ref["file"]
        try:
            arr = np.load(f, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"store file {f} (codec state) is missing") from None
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"store file {f} (codec state) is corrupt ({e})") from None
        if L.file_sha256(f) != ref["sha256"]:
            raise DataError(f"store file {f} (codec state) does not match its recorded sha256")
        arrays[key] = arr
    codec.load_state(arrays, codec_meta["params"], source=str(path / next(iter(files.values()))["file"]))
    return codec


def referenced_files(codec_meta: dict) -> set[str]:
    return {ref["file"] for ref in (codec_meta.get("state_files") or {}).values()}
