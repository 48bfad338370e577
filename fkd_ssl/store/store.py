"""Reading a finished target store: random access to any (image, view) record.

Shard files are memory-mapped lazily per process, so a store opened before ``fork`` is safe after it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from ..errors import ConfigError, DataError
from . import layout as L
from .codec_files import load_codec, referenced_files
from .codecs import Codec
from .identity import StoreShape


class TargetStore(StoreShape):
    """A finished store opened for reading (:meth:`open`): N, R, P, D, ``codec``, ``identity``, ``skipped``."""

    def __init__(self, path: Path, manifest: dict, codec: Codec):
        super().__init__(path, manifest, codec)
        self.manifest = manifest
        self.skipped_entries: list[dict] = list(manifest["skipped"])
        self.skipped: frozenset[int] = frozenset(int(e["index"]) for e in self.skipped_entries)
        self._skip_mask = np.zeros(self.num_images, dtype=bool)
        self._skip_mask[list(self.skipped)] = True
        self.dtype = L.record_dtype(self.param_dim, codec.fields(self.target_dim))
        self.stored_dtype = L.stored_dtype(self.geometry, codec.fields(self.target_dim))
        self._fields = [n for n in self.dtype.names if n != L.PARAMS_FIELD]
        self._maps: dict[tuple[int, bool], np.memmap] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False, expect_identity: dict | None = None) -> "TargetStore":
        """Open the store at ``path`` (manifest, version, file sizes; ``verify``: all checksums).
        ``expect_identity``: identity keys it must have, else ConfigError naming them."""
        path = Path(path)
        mpath = path / L.MANIFEST
        if path.is_file():
            raise DataError(f"{path} is a file, not a target store (a folder)")
        if not path.is_dir():
            raise DataError(f"target store {path} does not exist")
        if not mpath.exists():
            if (path / L.HEADER).exists():
                S = L.read_json(path / L.HEADER).get("num_shards", "?")
                done = sum(1 for n in os.listdir(path) if n.endswith(".sha256.json"))
                raise DataError(f"target store {path} is not finished ({done} of {S} shards complete, no {L.MANIFEST}); "
                                f"rerun the command that writes it")
            raise DataError(f"{path} is not a target store (no {L.MANIFEST})")
        m = L.read_json(mpath)
        if not isinstance(m, dict) or m.get("format") != L.FORMAT:
            raise DataError(f"{mpath} is not a target store manifest")
        if m.get("version") not in L.READABLE:
            raise DataError(f"{mpath} has store format version {m.get('version')} (this fkd_ssl reads "
                            f"{', '.join(map(str, L.READABLE))}): open it with the fkd_ssl that wrote it, or regenerate it")
        if not m.get("complete") or len(m.get("shards", [])) != m.get("num_shards"):
            raise DataError(f"{mpath} describes an incomplete store")
        for entry in m["shards"]:
            cf = path / L.shard_file(entry["shard"], "sha256.json")
            if not cf.exists():
                raise DataError(f"store file {cf} is missing")
            L.check_files(path, entry, "the manifest")
        codec = load_codec(path, m["codec"])
        store = cls(path, m, codec)
        if L.dtype_to_json(store.stored_dtype) != m.get("record_dtype"):
            raise DataError(f"{mpath}: record layout {m.get('record_dtype')} does not match codec {codec.name}")
        if expect_identity is not None:
            store.check_identity(expect_identity)
        if verify:
            store.verify()
        else:  # a few images spread over the store: the parameters recomputed here are the teacher's
            valid = store.valid_indices()
            store.check_replay(valid[np.linspace(0, len(valid) - 1, min(4, len(valid))).astype(np.int64)])
        return store

    def check_replay(self, idx: ArrayLike | None = None) -> None:
        """DataError unless the view parameters recomputed here for images ``idx`` (default: all valid)
        match the check values the writer stored (a ``replay`` store; others pass)."""
        if self.geometry.kind != "replay":
            return
        idx = self.valid_indices() if idx is None else np.asarray(idx, dtype=np.int64)
        bad = self.geometry.mismatched(idx, self.images(idx), self.views_per_image)
        if bad:
            prov = self.manifest.get("provenance") or {}
            raise DataError(f"store {self.path}: the views recomputed here differ from those its teacher saw (image "
                            f"{bad[0]}; {len(bad)} of {len(idx)} checked): it was written with numpy "
                            f"{prov.get('numpy', '?')} and fkd_ssl {prov.get('git_sha', '?')}, this is numpy "
                            f"{np.__version__}; replay it with those, or regenerate the store")

    def check_identity(self, expected: dict) -> None:
        """ConfigError naming every key of ``expected`` whose value differs from the store's
        identity (nested dicts compared key by key; keys absent from ``expected`` are ignored)."""
        want, ident = L.normalise(expected, "expected identity"), self.identity.to_dict()
        diff = L.diff_keys(_restrict(ident, want), want)
        if diff:
            shown = ", ".join(f"{d}: {L.get_dotted(ident, d)!r} (expected {L.get_dotted(want, d)!r})"
                              for d in diff[:4])
            raise ConfigError(f"target store {self.path} was made for other settings: {shown}")

    def files(self) -> list[str]:
        """Every checksummed file of the store (relative names)."""
        out = sorted(referenced_files(self.manifest["codec"]))
        for entry in self.manifest["shards"]:
            out += sorted(entry["files"]) + [L.shard_file(entry["shard"], "sha256.json")]
        return out

    def verify(self) -> None:
        """Recompute every file's sha256 against the manifest; DataError naming the first bad
        file.  Reads the whole store."""
        hpath = self.path / L.HEADER
        header = L.read_json(hpath)
        if not isinstance(header, dict) or any(self.manifest.get(k) != v for k, v in header.items()):
            raise DataError(f"store file {hpath} does not match {self.path / L.MANIFEST}")
        for entry in self.manifest["shards"]:
            cf = self.path / L.shard_file(entry["shard"], "sha256.json")
            if L.read_json(cf) != entry:
                raise DataError(f"store file {cf} does not match {self.path / L.MANIFEST}")
            L.check_files(self.path, entry, cf.name, sha256=True)
            done = self.path / L.shard_file(entry["shard"], "done.npy")
            if (np.load(done, allow_pickle=False) == L.DONE_NOT).any():
                raise DataError(f"store file {done} marks images as not written")
        load_codec(self.path, self.manifest["codec"])  # codec state files against their checksums
        self.check_replay()

    def digest(self) -> str:
        """16 hex digits of the store's identity and shard checksums: a regenerated store is another one
        (students record it so that rerunning a run against a new store is refused)."""
        blob = json.dumps({"identity": self.manifest["identity"], "shards": self.manifest["shards"]}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def nbytes(self) -> int:
        """Total bytes of the store's checksummed files."""
        return sum((self.path / n).stat().st_size for n in self.files())

    def valid_indices(self) -> np.ndarray:
        """int64 (N - skipped,): image indices that have targets (ascending)."""
        return np.nonzero(~self._skip_mask)[0].astype(np.int64)

    def _map(self, s: int, images: bool = False) -> np.memmap:
        """The records (n, R) of shard ``s``, or its per-image rows (n,)."""
        if os.getpid() != self._pid:  # a forked child: never reuse the parent's maps
            self._maps = {}
            self._pid = os.getpid()
        mm = self._maps.get((s, images))
        if mm is None:
            start, stop = L.shard_range(s, self.num_images, self.shard_size)
            kind, dtype, shape = (("images.npy", self.geometry.image_dtype, (stop - start,)) if images
                                  else ("records.npy", self.stored_dtype, (stop - start, self.views_per_image)))
            mm = L.open_npy(self.path / L.shard_file(s, kind), "r", dtype, shape)
            self._maps[(s, images)] = mm
        return mm

    def images(self, idx: np.ndarray) -> np.ndarray:
        """Per-image rows (height, width, check) of images ``idx`` of a ``replay`` store."""
        out, shard = np.empty(len(idx), self.geometry.image_dtype), idx // self.shard_size
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._map(int(s), True)[idx[sel] - int(s) * self.shard_size]
        return out

    def records(self, idx_i: ArrayLike, idx_r: ArrayLike) -> np.ndarray:
        """Records (``dtype``: ``params`` float32 (P,) then the codec's fields, (B,)) of views ``(idx_i[b], idx_r[b])``; the two
        index arrays broadcast against each other (e.g. one image, several views)."""
        i, r = np.broadcast_arrays(np.asarray(idx_i, dtype=np.int64), np.asarray(idx_r, dtype=np.int64))
        i, r = i.reshape(-1), r.reshape(-1)
        if i.size == 0:
            return np.zeros(0, dtype=self.dtype)
        if i.min() < 0 or i.max() >= self.num_images:
            raise IndexError(f"image index out of range 0..{self.num_images - 1}")
        if r.min() < 0 or r.max() >= self.views_per_image:
            raise IndexError(f"view index out of range 0..{self.views_per_image - 1}")
        if self._skip_mask[i].any():
            bad = int(i[self._skip_mask[i]][0])
            raise DataError(f"image {bad} was skipped when store {self.path} was written; read valid_indices() only")
        shard = i // self.shard_size
        s0 = int(shard[0])
        if (shard == s0).all():
            raw = self._map(s0)[i - s0 * self.shard_size, r]
        else:
            raw = np.empty(i.shape, dtype=self.stored_dtype)
            for s in np.unique(shard):
                sel = shard == s
                raw[sel] = self._map(int(s))[i[sel] - int(s) * self.shard_size, r[sel]]
        if self.geometry.kind == "float32":
            return raw
        out = np.empty(i.shape, dtype=self.dtype)
        for f in self._fields:
            out[f] = raw[f]
        out[L.PARAMS_FIELD] = self.geometry.decode(raw, i, r, self.images(i) if self.geometry.image_dtype else None)
        return out

    def params(self, i: int, r: int) -> np.ndarray:
        """float32 (P,): the geometry of view ``r`` of image ``i``, exactly as written."""
        return self.params_batch(np.array([i]), np.array([r]))[0]

    def params_batch(self, idx_i: ArrayLike, idx_r: ArrayLike) -> np.ndarray:
        """float32 (B, P) for the views ``(idx_i[b], idx_r[b])``."""
        return np.ascontiguousarray(self.records(idx_i, idx_r)[L.PARAMS_FIELD])

    def targets(self, idx_i: ArrayLike, idx_r: ArrayLike) -> np.ndarray:
        """float32 (B, D): decoded targets of the views ``(idx_i[b], idx_r[b])``."""
        return self._decode(self.records(idx_i, idx_r))

    def read(self, idx_i: ArrayLike, idx_r: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """(params float32 (B, P), targets float32 (B, D)) with one read per record."""
        rec = self.records(idx_i, idx_r)
        return np.ascontiguousarray(rec[L.PARAMS_FIELD]), self._decode(rec)

    def _decode(self, rec: np.ndarray) -> np.ndarray:
        return self.codec.decode({f: rec[f] for f in self._fields})

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}  # maps are reopened in the receiving process
        return state

    def __repr__(self) -> str:
        return (f"TargetStore({str(self.path)!r}, N={self.num_images}, R={self.views_per_image}, "
                f"P={self.param_dim}, D={self.target_dim}, codec={self.codec.name})")


def _restrict(have, want):
    """``have`` limited to the keys present in ``want`` (recursively for dicts)."""
    if isinstance(have, dict) and isinstance(want, dict):
        return {k: _restrict(have.get(k), v) for k, v in want.items() if k in have}
    return have

