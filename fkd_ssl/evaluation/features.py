"""Frozen features of any model on any dataset, cached on disk and shared by every evaluator.

The ``--checkpoint`` forms, the eval transform and the cache layout are in docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoint import load_model, model_identity, resolve_path, weights_digest
from ..data.datasets import IndexedDataset
from ..dist import DistContext, all_gather_cat, barrier, broadcast_object
from ..errors import CheckpointError, ConfigError, DataError, prepare_out_dir
from ..fileio import atomic_path, write_text_atomic
from ..models import IMAGENET_MEAN, IMAGENET_STD, NAMED_TEACHERS, Encoder, ModelSpec
from ..progress import bar
from ..store.layout import create_npy

CACHE_VERSION = 1
OUTPUTS = ("backbone", "head")
DTYPES = ("float16", "float32")
DEFAULT_PIXEL_SIZE = 32
_FP16_MAX = float(np.finfo(np.float16).max)


def eval_transform(input_size: int, mean: Sequence[float], std: Sequence[float],
                   interpolation: str = "bilinear", crop_pct: float = 0.875) -> tuple[Callable, dict]:
    """Resize (shorter side to ``round(S / crop_pct)``) + centre crop ``S`` + normalise; also its JSON description."""
    from torchvision import transforms as T

    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    try:
        mode = T.InterpolationMode(interpolation)
    except ValueError as e:
        raise ConfigError(f"unknown interpolation {interpolation!r} in the model spec") from e
    resize = int(round(input_size / crop_pct))
    transform = T.Compose([
        T.Resize(resize, interpolation=mode),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    desc = {"resize": resize, "crop": int(input_size), "interpolation": interpolation,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return transform, desc


def spec_eval_transform(spec: ModelSpec, input_size: int | None = None) -> tuple[Callable, dict]:
    """:func:`eval_transform` from a model spec (``input_size`` overrides ``spec.input_size``)."""
    return eval_transform(input_size or spec.input_size, spec.mean, spec.std, spec.interpolation,
                          float(spec.extra.get("crop_pct", 0.875)))


@dataclass
class FeatureSource:
    """Maps transformed images ``(B, 3, S, S)`` to ``(B, D)`` features; ``identity`` names the exact weights."""

    ref: str
    name: str
    identity: str
    output: str  # "backbone", "head" or "pixels"
    transform: Callable
    transform_desc: dict
    feature_dim: int
    input_size: int
    meta: dict = field(default_factory=dict)
    encoder: Encoder | None = None

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "unknown"))

    @property
    def arch(self) -> str:
        return self.encoder.spec.arch if self.encoder is not None else "pixels"

    def to(self, device: torch.device | str) -> "FeatureSource":
        if self.encoder is not None:
            self.encoder.to(device)
        return self

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, feature_dim) float32 features."""
        if self.encoder is None:
            return x.flatten(1).float()
        self.encoder.eval()
        out = self.encoder.project(x) if self.output == "head" else self.encoder.features(x)
        return out.float()

    def describe(self) -> dict:
        return {"ref": self.ref, "name": self.name, "identity": self.identity, "output": self.output,
                "arch": self.arch, "method": self.method, "feature_dim": self.feature_dim,
                "input_size": self.input_size, "transform": self.transform_desc}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def resolve_source(ref: str, *, arch: str | None = None, stem: str | None = None, input_size: int | None = None,
                   output: str = "backbone", seed: int = 0, name: str | None = None) -> FeatureSource:
    """Build a :class:`FeatureSource` from a ``--checkpoint`` value (forms: docs/evaluation.md)."""
    if output not in OUTPUTS:
        raise ConfigError(f"--features {output!r}: one of {', '.join(OUTPUTS)}")
    if input_size is not None and input_size <= 0:
        raise ConfigError(f"--input-size must be positive, got {input_size}")
    if stem is not None and not ref.startswith("random:"):
        raise ConfigError("--stem only applies to --checkpoint random:ARCH (a checkpoint records its own stem)")
    if ref == "pixels" or ref.startswith("pixels:"):
        if output == "head":
            raise ConfigError("--features head needs a model with a projection head, not raw pixels")
        size = input_size or DEFAULT_PIXEL_SIZE
        if ref.startswith("pixels:"):
            try:
                size = int(ref.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"--checkpoint {ref!r}: expected pixels or pixels:SIZE (e.g. pixels:32)") from None
            if size <= 0 or (input_size is not None and input_size != size):
                raise ConfigError(f"--checkpoint {ref!r}: bad pixel size (or it conflicts with --input-size)")
        transform, desc = eval_transform(size, IMAGENET_MEAN, IMAGENET_STD, "bilinear", crop_pct=1.0)
        return FeatureSource(ref, name or f"pixels{size}", f"pixels:{size}", "pixels", transform, desc,
                             3 * size * size, size, {"method": "raw-pixels"})
    if ref.startswith("random:"):
        arch_name = ref.split(":", 1)[1]
        if not arch_name:
            raise ConfigError(f"--checkpoint {ref!r}: expected random:ARCH (e.g. random:resnet18)")
        spec = ModelSpec(arch=arch_name, stem=stem or "default", input_size=input_size or 224, head="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = Encoder(spec).eval()
        identity = f"random:{arch_name}:{weights_digest(encoder)}"
        transform, desc = spec_eval_transform(spec)
        if output == "head":
            raise ConfigError("--features head: a random:ARCH model has no projection head")
        label = name or f"random-{arch_name}" + (f"-{spec.stem}" if spec.stem != "default" else "") + f"-{spec.input_size}"
        return FeatureSource(ref, label, identity, output, transform, desc, encoder.feature_dim, spec.input_size,
                             {"method": "random-init", "model": spec.to_dict(), "seed": seed}, encoder)
    encoder, meta = load_model(ref, arch=arch, expect="projector" if output == "head" else None)
    identity = model_identity(ref) if ref in NAMED_TEACHERS else f"{model_identity(ref)}:{arch or ''}"
    transform, desc = spec_eval_transform(encoder.spec, input_size)
    dim = encoder.spec.head_out if output == "head" else encoder.feature_dim
    if name is None:
        if ref in NAMED_TEACHERS:
            name = ref
        else:
            p = Path(ref)
            stem_name = p.name.removesuffix(".json").removesuffix(".safetensors")
            name = f"{p.parent.name}/{stem_name}" if p.parent.name else stem_name
        if output == "head":
            name += "[head]"
    return FeatureSource(ref, name, identity, output, transform, desc, int(dim), input_size or encoder.spec.input_size,
                         meta, encoder)


def default_out_dir(source: FeatureSource) -> Path:
    """Where an evaluation's JSON goes by default: beside a checkpoint file, else ``runs/eval/<name>``."""
    ref = source.ref
    if source.encoder is not None and ref not in NAMED_TEACHERS and not ref.startswith("random:"):
        return resolve_path(ref).parent / "eval"
    return Path("runs") / "eval" / _slug(source.name)


@dataclass
class FeatureSet:
    """Features ``(N, D)`` and labels ``(N,)`` of one split, with the cache manifest."""

    features: np.ndarray
    labels: np.ndarray
    manifest: dict
    cached: bool = False
    seconds: float = 0.0


def cache_key(source: FeatureSource, dataset: IndexedDataset, dtype: str) -> tuple[str, dict]:
    """The cache key (16 hex) of ``source`` on ``dataset`` and what it hashes."""
    what = {"version": CACHE_VERSION, "model": source.identity, "output": source.output,
            "data": dataset.fingerprint(), "split": dataset.split, "num_images": len(dataset),
            "transform": source.transform_desc, "dtype": dtype}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16], what


def load_cached(folder: Path, key: str) -> FeatureSet | None:
    """The finished cache in ``folder`` if it is complete and matches ``key``, else None."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != key or not manifest.get("complete"):
            return None
        feats = np.load(folder / "features.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None  # unreadable / truncated: re-extract
    n, d = manifest["num_images"], manifest["feature_dim"]
    if feats.shape != (n, d) or str(feats.dtype) != manifest["dtype"] or labels.shape != (n,):
        return None
    return FeatureSet(feats, labels.astype(np.int64), manifest, cached=True)


def _open_partial(folder: Path, n: int, d: int, dtype: str) -> tuple[np.memmap, np.memmap]:
    """Open (or create) the in-progress ``features.npy`` and ``filled.npy`` memmaps."""
    feats_path, filled_path = folder / "features.npy", folder / "filled.npy"
    try:
        feats = np.load(feats_path, mmap_mode="r+", allow_pickle=False)
        filled = np.load(filled_path, mmap_mode="r+", allow_pickle=False)
        if feats.shape == (n, d) and str(feats.dtype) == dtype and filled.shape == (n,) and filled.dtype == np.bool_:
            return feats, filled
    except (OSError, ValueError):
        pass
    (folder / "manifest.json").unlink(missing_ok=True)
    create_npy(filled_path, np.dtype(np.bool_), (n,))
    create_npy(feats_path, np.dtype(dtype), (n, d))
    return np.load(feats_path, mmap_mode="r+"), np.load(filled_path, mmap_mode="r+")


def extract_features(source: FeatureSource, dataset: IndexedDataset, ctx: DistContext, *, batch_size: int = 256,
                     workers: int = 2, cache_dir: str | os.PathLike | None = None, dtype: str = "float16",
                     flush_every: int = 50, progress: bool = True) -> FeatureSet | None:
    """Features ``(N, D)`` of every image of ``dataset`` (in dataset order), cached under ``cache_dir`` if given.

    Collective under DDP: rank 0 gets the :class:`FeatureSet`, others ``None``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--cache-dtype {dtype!r}: one of {', '.join(DTYPES)}")
    start = time.time()
    key, what = cache_key(source, dataset, dtype)
    n, d = len(dataset), source.feature_dim
    folder = Path(cache_dir).expanduser() / key if cache_dir is not None else None

    hit = load_cached(folder, key) if (folder is not None and ctx.is_main) else None
    if broadcast_object(hit is not None):
        return hit if ctx.is_main else None

    feats = filled = todo = None
    if ctx.is_main:
        if folder is not None:
            prepare_out_dir(folder.parent, "--cache-dir")
            folder.mkdir(exist_ok=True)
            feats, filled = _open_partial(folder, n, d, dtype)
        else:
            feats, filled = np.zeros((n, d), dtype=np.dtype(dtype)), np.zeros(n, dtype=np.bool_)
        todo = np.flatnonzero(~filled).astype(np.int64)
    todo = broadcast_object(todo)  # rank 0's indices on every rank

    mine = todo[ctx.rank::ctx.world_size]
    per_rank = -(-len(todo) // ctx.world_size)  # ceil: every rank runs the same number of steps
    steps = -(-per_rank // batch_size)
    old_transform = dataset.transform
    dataset.transform = source.transform
    source.to(ctx.device)
    labels_seen = np.full(n, -1, dtype=np.int64) if ctx.is_main else None
    try:
        it = iter(DataLoader(Subset(dataset, mine.tolist()), batch_size=batch_size, num_workers=workers,
                             pin_memory=ctx.device.type == "cuda")) if len(mine) else iter(())
        pbar = bar(len(todo), f"features {dataset.split}", "img", enabled=ctx.is_main and progress)
        for step in range(steps):
            batch = next(it, None)
            if batch is not None:
                x, y, idx = batch
                f = source.embed(x.to(ctx.device, non_blocking=True))
                if f.ndim != 2 or f.shape[1] != d:
                    raise CheckpointError(f"model {source.ref} gives features of shape {tuple(f.shape)}, expected (B, {d})")
                y, idx = y.to(ctx.device, torch.int64), idx.to(ctx.device, torch.int64)
            else:
                f = torch.zeros((0, d), device=ctx.device)
                y = idx = torch.zeros(0, dtype=torch.int64, device=ctx.device)
            f, y, idx = all_gather_cat(f), all_gather_cat(y), all_gather_cat(idx)
            if ctx.is_main:
                assert feats is not None and filled is not None and labels_seen is not None
                rows = idx.cpu().numpy()
                vals = f.cpu().numpy()
                if not np.isfinite(vals).all():
                    raise DataError(f"model {source.ref} produced non-finite features on {dataset.source(int(rows[0]))}")
                if dtype == "float16" and np.abs(vals).max(initial=0.0) > _FP16_MAX:
                    raise ConfigError(f"features of {source.ref} overflow float16; rerun with --cache-dtype float32")
                feats[rows] = vals.astype(feats.dtype)
                labels_seen[rows] = y.cpu().numpy()
                filled[rows] = True
                if folder is not None and (step + 1) % flush_every == 0:
                    feats.flush()  # type: ignore[union-attr]  # rows first, then the record of them
                    filled.flush()  # type: ignore[union-attr]
                pbar.update(len(rows))
        pbar.close()
    finally:
        dataset.transform = old_transform

    result: FeatureSet | None = None
    if ctx.is_main:
        assert feats is not None and filled is not None and labels_seen is not None
        if not filled.all():
            raise RuntimeError(f"feature extraction left {int((~filled).sum())} rows unwritten")
        targets = np.asarray(dataset.targets, dtype=np.int64)
        got = labels_seen >= 0
        if not np.array_equal(labels_seen[got], targets[got]):
            raise RuntimeError("gathered labels do not match the dataset order (index bookkeeping bug)")
        manifest = {"key": key, "complete": True, **what, "feature_dim": d, "source": source.describe(),
                    "dataset": dataset.describe(), "seconds": round(time.time() - start, 2)}
        if folder is not None:
            feats.flush()  # type: ignore[union-attr]
            with atomic_path(folder / "labels.npy") as tmp:
                np.save(tmp, targets, allow_pickle=False)
            # last: from here on the cache is trusted
            write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True, default=str))
            (folder / "filled.npy").unlink(missing_ok=True)
            del feats
            result = load_cached(folder, key)
            assert result is not None
            result.cached = False
        else:
            result = FeatureSet(feats, targets, manifest, cached=False)
        result.seconds = time.time() - start
    barrier()
    return result
