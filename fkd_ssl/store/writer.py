"""Writing a target store: resumable, sharded, one writer process per set of shards.

Usage, resume, ranks and crash safety (records flushed before done flags): docs/store.md.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ConfigError, DataError
from . import layout as L
from .codec_files import load_codec, referenced_files, save_codec_state
from .codecs import Codec
from .geometry import Geometry, default_geometry, from_spec
from .identity import StoreIdentity, StoreShape


def owned_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards written by ``rank`` of ``world_size`` writers: ``rank, rank + W, rank + 2W, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    return list(range(rank, num_shards, world_size))


def default_provenance() -> dict:
    """The command line and git SHA of this process (stored in the header at creation)."""
    from ..cli import git_sha

    return {"command": shlex.join(sys.argv), "git_sha": git_sha(), "numpy": np.__version__}


def _log(path: Path, event: str, **extra) -> None:
    line = json.dumps({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                       "pid": os.getpid(), **extra}, sort_keys=True, default=str)
    try:
        with open(path / L.LOG, "ab", buffering=0) as f:  # appended in one write: ranks' lines do not interleave
            f.write((line + "\n").encode())
    except OSError:
        pass  # the log is a courtesy, never a reason to fail


# header keys that must match on resume, besides the codec (provenance and derived values are not compared)
_COMPARED = ("format", "version", "identity", "num_images", "views_per_image", "param_dim", "target_dim",
             "shard_size", "geometry")


class _Shard:
    """The open files of one shard in a writer: records (n, R), done (n,) and images (n,) memmaps."""

    def __init__(self, records: np.memmap, done: np.memmap, images: np.memmap | None, skipped: dict[int, dict]):
        self.records, self.done, self.images, self.skipped = records, done, images, skipped


class StoreWriter(StoreShape):
    """Writes the shards it owns of one store.  Create with :meth:`create_or_resume`."""

    def __init__(self, path: Path, header: dict, codec: Codec, shards: list[int], sync: bool):
        super().__init__(path, header, codec)
        self.shards = shards
        self._owned = set(shards)
        self.sync = sync
        self.dtype = L.stored_dtype(self.geometry, codec.fields(self.target_dim))
        self._open: dict[int, _Shard] = {}

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, identity: StoreIdentity | dict, *, num_images: int, views_per_image: int,
                         param_dim: int, target_dim: int, codec: Codec, shard_size: int = 4096,
                         overwrite: bool = False, shards: Iterable[int] | None = None,
                         provenance: dict | None = None, sync: bool = True,
                         geometry: Geometry | None = None) -> "StoreWriter":
        """Create the store at ``path`` or resume the one there (same identity, sizes, geometry and codec, else
        ConfigError naming the differing keys; ``overwrite=True`` replaces it).  A trained codec may be
        passed unfitted when resuming.  ``shards``: those this process writes (default all).  ``geometry``:
        how view parameters are kept (default :func:`~.geometry.default_geometry`)."""
        path = Path(path)
        for name, v, lo in (("num_images", num_images, 1), ("views_per_image", views_per_image, 1),
                            ("param_dim", param_dim, 0), ("target_dim", target_dim, 1), ("shard_size", shard_size, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"store {name} must be an int >= {lo}, got {v!r}")
        codec.check_dim(int(target_dim))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"store path {path} is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        identity = StoreIdentity.of(identity).to_dict()
        geometry = geometry or default_geometry(int(param_dim), identity)
        S = L.num_shards(int(num_images), int(shard_size))
        want = {
            "format": L.FORMAT, "version": L.VERSION, "identity": identity,
            "num_images": int(num_images), "views_per_image": int(views_per_image), "param_dim": int(param_dim),
            "target_dim": int(target_dim), "shard_size": int(shard_size), "num_shards": S,
            "geometry": L.normalise(geometry.spec(), "geometry"),
        }
        header_path = path / L.HEADER
        if header_path.exists():
            try:
                old = L.read_json(header_path)
            except DataError:
                if not overwrite:
                    raise
                old = {}
            mismatch = cls._mismatch(old, want, codec)
            if mismatch and not overwrite:
                pairs = "; ".join(mismatch[:6]) + ("; ..." if len(mismatch) > 6 else "")
                raise ConfigError(f"store {path} was made with other settings ({pairs}); "
                                  f"use another path, or overwrite=True / --overwrite to replace it")
            if mismatch:
                cls._delete_store_files(path)
        elif any(n.startswith("shard-") and L.is_store_file(n) for n in os.listdir(path)):
            if not overwrite:
                raise ConfigError(f"store {path} has shard files but no {L.HEADER}; "
                                  f"pass overwrite=True to start afresh")
            cls._delete_store_files(path)
        if not header_path.exists():
            cls._create(path, want, codec, provenance if provenance is not None else default_provenance())
        header = L.read_json(header_path)
        if cls._mismatch(header, want, codec):  # another process created it concurrently with other settings
            raise ConfigError(f"store {path} was just created by another process with other settings")
        if header["codec"].get("state_files"):
            load_codec(path, header["codec"], into=None if codec.is_fitted else codec)  # checks the files
        owned = list(range(S)) if shards is None else sorted({int(s) for s in shards})
        bad = [s for s in owned if not 0 <= s < S]
        if bad:
            raise ConfigError(f"shards {bad[:5]} are out of range for store {path} (0..{S - 1})")
        prefixes = tuple(L.shard_file(s, "") for s in owned)
        for name in os.listdir(path):  # leftovers of a write killed before its rename; only we write these
            if L.is_tmp_file(name) and name.startswith(prefixes):
                (path / name).unlink(missing_ok=True)
        _log(path, "open_writer", shards=f"{len(owned)} of {S}", command=shlex.join(sys.argv))
        return cls(path, header, codec, owned, sync)

    @staticmethod
    def _mismatch(old: dict, want: dict, codec: Codec) -> list[str]:
        out = [f"{d}: {L.get_dotted(old, d)!r} -> {L.get_dotted(want, d)!r}"
               for k in _COMPARED for d in L.diff_keys(old.get(k), want[k], k)]
        oc = old.get("codec") or {}
        if oc.get("name") != codec.name:
            return out + [f"codec: {oc.get('name')!r} -> {codec.name!r}"]
        oparams = oc.get("params") or {}
        new = L.normalise(codec.params if codec.is_fitted else codec.config, "codec params")
        old_cmp = oparams if codec.is_fitted else {k: oparams.get(k) for k in new}
        return out + [f"codec.params.{d}: {L.get_dotted(old_cmp, d)!r} -> {L.get_dotted(new, d)!r}"
                      for d in L.diff_keys(old_cmp, new)]

    @staticmethod
    def _delete_store_files(path: Path) -> None:
        for name in sorted(os.listdir(path)):
            if L.is_store_file(name):
                (path / name).unlink()

    @staticmethod
    def _create(path: Path, want: dict, codec: Codec, provenance: dict) -> None:
        if codec.trained and not codec.is_fitted:
            raise ConfigError(f"codec {codec.name} is not trained: call codec.fit(sample) before creating store {path}")
        state_files = save_codec_state(path, codec)  # before the header that references them
        fields = codec.fields(want["target_dim"])
        header = {**want, "codec": {"name": codec.name, "params": L.normalise(codec.params, "codec params"),
                                    "bytes_per_view": codec.bytes_per_view(want["target_dim"]),
                                    "state_files": state_files},
                  "record_dtype": L.dtype_to_json(L.stored_dtype(from_spec(want["geometry"], want["param_dim"]), fields)),
                  "provenance": L.normalise(provenance, "provenance")}
        L.write_json_atomic(path / L.HEADER, header, exclusive=True)  # first creator wins
        _log(path, "create")

    def _range(self, s: int) -> tuple[int, int]:
        return L.shard_range(s, self.num_images, self.shard_size)

    def _shard(self, s: int) -> _Shard:
        """Open (creating on first use) the files of owned, not yet complete shard ``s``."""
        if s not in self._owned:
            raise ConfigError(f"shard {s} of store {self.path} is not owned by this writer (owns {len(self.shards)} shards)")
        sh = self._open.get(s)
        if sh is not None:
            return sh
        if (self.path / L.shard_file(s, "sha256.json")).exists():
            raise ConfigError(f"shard {s} of store {self.path} is complete (has {L.shard_file(s, 'sha256.json')}); "
                              f"it is not rewritten")
        start, stop = self._range(s)
        n, R = stop - start, self.views_per_image
        rec_p, done_p, skip_p, img_p = (self.path / L.shard_file(s, kind) for kind in L.SHARD_FILES)
        img_dt = self.geometry.image_dtype
        if not done_p.exists():  # the done mask is created last: without it nothing was committed
            L.create_npy(rec_p, self.dtype, (n, R))
            if img_dt is not None:
                L.create_npy(img_p, img_dt, (n,))
            L.write_json_atomic(skip_p, [])
            L.create_npy(done_p, np.dtype(np.uint8), (n,))
        records = L.open_npy(rec_p, "r+", self.dtype, (n, R))
        done = L.open_npy(done_p, "r+", np.dtype(np.uint8), (n,))
        images = L.open_npy(img_p, "r+", img_dt, (n,)) if img_dt is not None else None
        entries = L.read_json(skip_p)
        sh = _Shard(records, done, images, {int(e["index"]): e for e in entries})
        self._open[s] = sh
        return sh

    def missing_images(self, shard_ids: Iterable[int] | None = None) -> np.ndarray:
        """Global indices (int64, ascending) of images neither written nor skipped in the given shards
        (default: this writer's).  Reads only done masks."""
        out = []
        for s in (self.shards if shard_ids is None else shard_ids):
            s = int(s)
            if not 0 <= s < self.num_shards:
                raise ConfigError(f"shard {s} is out of range for store {self.path} (0..{self.num_shards - 1})")
            (start, stop), done_p = self._range(s), self.path / L.shard_file(s, "done.npy")
            done = (self._open[s].done if s in self._open
                    else L.open_npy(done_p, "r", np.dtype(np.uint8), (stop - start,)) if done_p.exists()
                    else np.zeros(stop - start, np.uint8))  # no done mask yet: nothing written
            out.append(start + np.flatnonzero(np.asarray(done) == L.DONE_NOT).astype(np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def write(self, indices: np.ndarray, params: np.ndarray, targets: np.ndarray, sizes=None) -> None:
        """Store the views of images ``indices`` (distinct, in owned shards): ``params`` float32 (B, R, P),
        ``targets`` float (B, R, D), encoded by the store's codec; ``sizes`` (B, 2) the images' (height,
        width), needed by a ``replay`` geometry."""
        idx = self._check_views(indices, params)
        B, R, D = len(idx), self.views_per_image, self.target_dim
        targets = np.asarray(targets, dtype=np.float32)
        if targets.shape != (B, R, D):
            raise ValueError(f"targets shape {targets.shape}, expected {(B, R, D)}")
        if not np.isfinite(targets).all():
            raise DataError(f"targets for images {idx[:4].tolist()}... hold NaN or inf (teacher output)")
        enc = self.codec.encode(targets.reshape(B * R, D))
        self._commit(idx, params, {name: a.reshape((B, R) + a.shape[1:]) for name, a in enc.items()}, sizes)

    def write_encoded(self, indices: np.ndarray, params: np.ndarray, fields: dict[str, np.ndarray], sizes=None) -> None:
        """:meth:`write` for targets already encoded: every codec field as an array (B, R, *shape)."""
        idx = self._check_views(indices, params)
        B, R = len(idx), self.views_per_image
        want = {n: (self.dtype.fields[n][0].base, (B, R) + self.dtype.fields[n][0].shape)
                for n in self.dtype.names if n not in self.geometry.fields()}
        if set(fields) != set(want):
            raise ValueError(f"encoded fields {sorted(fields)}, the codec {self.codec.name} has {sorted(want)}")
        for n, (dt, shape) in want.items():
            a = fields[n]
            if np.asarray(a).dtype != dt or np.shape(a) != shape:
                raise ValueError(f"encoded field {n} is {np.asarray(a).dtype} {np.shape(a)}, expected {dt} {shape}")
        self._commit(idx, params, fields, sizes)

    def _check_views(self, indices: np.ndarray, params: np.ndarray) -> np.ndarray:
        """The image indices (int64 (B,)) after checking them and ``params`` (B, R, P)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        B, R, P = len(idx), self.views_per_image, self.param_dim
        params = np.asarray(params)
        if params.dtype != np.float32:
            raise ValueError(f"params must be float32 (stored bit-exactly), got {params.dtype}")
        if params.shape != (B, R, P):
            raise ValueError(f"params shape {params.shape}, expected {(B, R, P)}")
        if B and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image index out of range 0..{self.num_images - 1}")
        if len(np.unique(idx)) != B:
            raise ValueError("write() got the same image index twice")
        if not np.isfinite(params).all():
            raise DataError(f"params for images {idx[:4].tolist()}... hold NaN or inf")
        return idx

    def _commit(self, idx: np.ndarray, params: np.ndarray, fields: dict[str, np.ndarray], sizes) -> None:
        """Write the records (and per-image rows), flush them, then set the images' done flags."""
        if not len(idx):
            return
        batch = np.empty((len(idx), self.views_per_image), dtype=self.dtype)
        geo, rows = self.geometry.encode(idx, params, sizes)
        for name, arr in {**geo, **fields}.items():
            batch[name] = arr
        shard_ids = idx // self.shard_size
        for s in np.unique(shard_ids):
            s = int(s)
            sh = self._shard(s)
            sel = np.nonzero(shard_ids == s)[0]
            local = idx[sel] - s * self.shard_size
            stale = [int(i) for i in idx[sel] if int(i) in sh.skipped]
            sh.records[local] = batch[sel]
            if rows is not None:
                sh.images[local] = rows[sel]
            if self.sync:
                sh.records.flush()
                if rows is not None:
                    sh.images.flush()
            if stale:  # written now after having been skipped by an interrupted run
                for i in stale:
                    del sh.skipped[i]
                self._save_skipped(s, sh)
            sh.done[local] = L.DONE_WRITTEN
            if self.sync:
                sh.done.flush()

    def skip(self, index: int, path: str, reason: str) -> None:
        """Record image ``index`` as unreadable (``path`` and one-line ``reason``); readers exclude it."""
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range 0..{self.num_images - 1}")
        s = index // self.shard_size
        sh = self._shard(s)
        sh.skipped[index] = {"index": index, "path": str(path), "reason": " ".join(str(reason).split())}
        self._save_skipped(s, sh)  # the list first, then the flag
        sh.done[index - s * self.shard_size] = L.DONE_SKIPPED
        if self.sync:
            sh.done.flush()

    def _save_skipped(self, s: int, sh: _Shard) -> None:
        L.write_json_atomic(self.path / L.shard_file(s, "skipped.json"), [sh.skipped[i] for i in sorted(sh.skipped)])

    def complete_shard(self, s: int) -> dict:
        """Checksum owned shard ``s`` once every image is written or skipped (``shard-XXXXX.sha256.json``,
        returned).  Idempotent; ConfigError if images are still missing."""
        s = int(s)
        f = self.path / L.shard_file(s, "sha256.json")
        if f.exists():
            return L.read_json(f)
        sh = self._shard(s)
        flags, (start, stop) = np.asarray(sh.done), self._range(s)
        missing = int((flags == L.DONE_NOT).sum())
        if missing:
            raise ConfigError(f"shard {s} of store {self.path} still misses {missing} images; write or skip them first")
        marked = {start + int(i) for i in np.nonzero(flags == L.DONE_SKIPPED)[0]}
        if set(sh.skipped) != marked:  # the done mask is the truth: drop stale entries
            lost = marked - set(sh.skipped)
            if lost:
                raise DataError(f"store file {self.path / L.shard_file(s, 'skipped.json')} lacks skipped images "
                                f"{sorted(lost)[:5]}")
            sh.skipped = {i: e for i, e in sh.skipped.items() if i in marked}
            self._save_skipped(s, sh)
        self._release(s)
        del sh
        names = [L.shard_file(s, kind) for kind in L.SHARD_FILES]
        entry = {"shard": s, "start": start, "stop": stop,
                 "files": {name: L.file_entry(self.path / name) for name in names if (self.path / name).exists()}}
        L.write_json_atomic(f, entry)
        return entry

    def complete_owned(self) -> None:
        """:meth:`complete_shard` for every owned shard (ConfigError if any image is missing)."""
        for s in self.shards:
            self.complete_shard(s)

    def _release(self, s: int) -> None:
        """Flush and close the files of open shard ``s``."""
        sh = self._open.pop(s)
        for a in (sh.records, sh.done, sh.images):
            if a is not None:
                a.flush()

    def close(self) -> None:
        """Flush and release the open shard files (the writer can still be used after)."""
        for s in list(self._open):
            self._release(s)


def finalize(path: str | os.PathLike, timeout_s: float = 0.0, poll_s: float = 2.0) -> dict:
    """Write ``manifest.json`` once every shard is complete (rank 0, after the writers; waits up to
    ``timeout_s`` for other ranks' checksum files).  DataError naming the incomplete shards otherwise."""
    path = Path(path)
    header = L.read_json(path / L.HEADER)
    S = header["num_shards"]
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [s for s in range(S) if not (path / L.shard_file(s, "sha256.json")).exists()]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise DataError(f"store {path} is incomplete: {len(missing)} of {S} shards have no checksum file "
                        f"(shards {shown}); rerun the writers")
    shards, skipped = [], []
    for s in range(S):
        cf = path / L.shard_file(s, "sha256.json")
        entry = L.read_json(cf)
        L.check_files(path, entry, str(cf))
        sk = path / L.shard_file(s, "skipped.json")
        if L.file_sha256(sk) != entry["files"][sk.name]["sha256"]:
            raise DataError(f"store file {sk} does not match {cf}")
        skipped += L.read_json(sk)
        shards.append(entry)
    manifest = {**header, "complete": True, "shards": shards, "skipped": skipped, "num_skipped": len(skipped)}
    keep = referenced_files(header["codec"])
    for name in os.listdir(path):  # every writer is done: drop killed writes' leftovers, stray codebooks
        if L.is_tmp_file(name) or (name.startswith("codec.") and L.is_store_file(name) and name not in keep):
            (path / name).unlink(missing_ok=True)
    L.write_json_atomic(path / L.MANIFEST, manifest)
    _log(path, "finalize", num_skipped=len(skipped))
    return manifest
