"""ReLabel (Yun et al., CVPR 2021): dense label maps of a classifier teacher, pooled per crop.

The supervised FKD paper compares against ReLabel, which also runs a strong teacher once, ahead
of time, but stores something else: instead of a soft label per random crop it stores a *label
map* per image -- the teacher's class scores at every location of its last feature map, for the
whole image -- and derives a crop's label at training time by pooling that map over the crop's
box.  This module is that baseline, end to end:

* :func:`dense_scores` -- the label map: the teacher's classifier (a linear layer) applied at
  every location of the final feature map, before global pooling.  ``(B, 3, S, S)`` float input
  -> ``(B, C, h, w)`` logits per location; their spatial mean is the teacher's usual logits
  (average pooling and a linear layer commute), which is checked on every call.
* :func:`write_label_maps` / :class:`LabelMaps` -- a resumable, checksummed label-map store: the
  teacher runs once over every whole image (resized to ``S x S``); per location the top-k scores
  are kept (int16 class indices + float16 scores) in one fixed-dtype memory-mapped ``.npy``.
* :func:`relabel_targets` -- ReLabel's "LabelPooling": rebuild the dense ``(C, h, w)`` map from
  the top-k (zeros elsewhere), RoIAlign each crop box to a 1x1 output, softmax over classes.
* :class:`RelabelViews` -- a view source for :class:`fkd_ssl.replay.ReplayDataset` (like
  :class:`~fkd_ssl.replay.FreshViews`: new RandomResizedCrop views every epoch) whose targets are
  the ReLabel labels of those views, ``(K, C)`` probabilities.

On-disk format, RoIAlign conventions and the storage formula: ``docs/relabel.md``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data.image_io import load_uint8
from .errors import ConfigError, DataError
from .models import Encoder, TorchvisionBackbone
from .replay import FreshViews
from .store import layout as L
from .views import PARAM_FIELDS, ViewConfig, normalize

FORMAT = "fkd_ssl.label_maps"
VERSION = 1
HEADER, MAPS, DONE, SKIPPED, MANIFEST = "header.json", "maps.npy", "done.npy", "skipped.json", "manifest.json"
_FILES = (HEADER, MAPS, DONE, SKIPPED, MANIFEST)
DONE_NOT, DONE_WRITTEN, DONE_SKIPPED = 0, 1, 2
#: the largest class count int16 indices can hold
MAX_CLASSES = int(np.iinfo(np.int16).max) + 1
#: fields of a view's parameter vector that hold its crop box (fractions of the image)
BOX_FIELDS = ("y", "x", "h", "w")
_BOX = [PARAM_FIELDS.index(f) for f in BOX_FIELDS]

ArrayLike = Union[np.ndarray, torch.Tensor]


# ============================================================================ the label map


def classifier_weights(model: Encoder) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's final classifier as ``(weight (C, D), bias (C,) | None)``.

    Accepts an ``nn.Linear`` (timm's ``get_classifier()``, the torchvision ``fc``) or a 1x1
    ``nn.Conv2d``; anything else (an MLP head, a classifier with a norm or activation inside) is a
    ConfigError, since per-location class scores are then not defined.
    """
    if model.spec.num_classes == 0:
        raise ConfigError(f"teacher {model.spec.arch} has no classifier (num_classes=0): ReLabel needs a "
                          f"classifier teacher")
    head = model.backbone.get_classifier()
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.groups == 1:
        return head.weight.flatten(1), head.bias
    raise ConfigError(f"teacher {model.spec.arch}: its classifier is a {type(head).__name__}, not a linear layer, "
                      f"so per-location class scores (ReLabel's label map) are not defined for it")


def _feature_map(model: Encoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(map (B, D', h, w) as the model gives it, reference logits (B, C))``.

    The map is the input of the global pooling; the reference logits are what the model itself
    computes from it (its own head), used to check that the head is pooling + linear.
    """
    bb = model.backbone
    if isinstance(bb, TorchvisionBackbone):
        pool = getattr(bb.net, "avgpool", None)
        if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
            raise ConfigError(f"teacher {model.spec.arch}: no global average pooling (avgpool) found, so its "
                              f"per-location class scores are not defined")
        seen: list[torch.Tensor] = []
        handle = pool.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        try:
            pooled = bb.net(x)
        finally:
            handle.remove()
        with torch.autocast(x.device.type, enabled=False):
            return seen[-1], bb.fc(pooled.float())
    fmap = bb.forward_features(x)
    if fmap.ndim != 4:
        raise ConfigError(f"teacher {model.spec.arch}: its features are {tuple(fmap.shape)} (tokens), not a "
                          f"(B, C, h, w) map; ReLabel needs a convolutional teacher")
    with torch.autocast(x.device.type, enabled=False):
        return fmap, bb.forward_head(fmap.float())


@torch.no_grad()
def dense_scores(model: Encoder, x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """The teacher's class-score map: float ``(B, 3, S, S)`` normalised images -> float32 ``(B, C, h, w)``.

    ``out[b, :, i, j] = W f[b, :, i, j] + bias``: the classifier applied at every location of the
    final feature map ``f`` (timm: ``forward_features``, which includes e.g. EfficientNet's
    ``conv_head`` + ``bn2``; torchvision: the input of ``avgpool``), i.e. logits per location.
    The classifier runs in float32 even under autocast.  With ``check`` the spatial mean of the
    map must equal the model's own pooled logits (true exactly when the head is global average
    pooling followed by the linear layer); a model whose head does something else between
    pooling and classifier (MobileNetV3's conv after pooling, ConvNeXt's norm, max pooling) is a
    ConfigError.
    """
    weight, bias = classifier_weights(model)
    fmap, ref = _feature_map(model, x)
    D = weight.shape[1]
    if fmap.shape[1] != D and fmap.shape[-1] == D:  # channels-last features (e.g. Swin)
        fmap = fmap.permute(0, 3, 1, 2)
    if fmap.shape[1] != D:
        raise ConfigError(f"teacher {model.spec.arch}: its classifier takes {D} features but the final feature map "
                          f"has {fmap.shape[1]} channels (a head between pooling and classifier), so per-location "
                          f"class scores are not defined")
    with torch.autocast(x.device.type, enabled=False):
        out = torch.einsum("bdhw,cd->bchw", fmap.float(), weight.float())
        if bias is not None:
            out = out + bias.float().view(1, -1, 1, 1)
        if check:
            mean = out.mean(dim=(2, 3))
            tol = (1e-3 if fmap.dtype == torch.float32 else 5e-2) * (1.0 + float(ref.abs().max()))
            err = float((mean - ref.float()).abs().max())
            if err > tol:
                raise ConfigError(f"teacher {model.spec.arch}: the mean of its per-location scores differs from its "
                                  f"logits by {err:.3g} (its head is not global average pooling + a linear "
                                  f"classifier), so ReLabel's label map is not defined for it")
    return out


# ============================================================================ LabelPooling


def _as_tensor(a: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device) if device is not None else t


def dense_from_topk(values: ArrayLike, indices: ArrayLike, num_classes: int) -> torch.Tensor:
    """Top-k scores ``(..., h, w, k)`` + class indices (same shape) -> float32 dense map ``(..., C, h, w)``.

    Classes outside a location's top-k get 0 (as in ReLabel), not -inf.
    """
    v = _as_tensor(values).float()
    idx = _as_tensor(indices, v.device).long()
    if v.shape != idx.shape or v.ndim < 3:
        raise ValueError(f"values {tuple(v.shape)} and indices {tuple(idx.shape)} must both be (..., h, w, k)")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        raise ValueError(f"class indices out of range 0..{num_classes - 1}")
    *lead, h, w, k = v.shape
    dense = torch.zeros(*lead, h, w, num_classes, dtype=torch.float32, device=v.device)
    dense.scatter_(-1, idx, v)
    return dense.movedim(-1, -3).contiguous()


def box_rois(boxes: ArrayLike, height: int, width: int) -> torch.Tensor:
    """Crop boxes ``(K, 4)`` as ``[top, left, height, width]`` fractions of the image -> float32
    ``(K, 4)`` ``[x1, y1, x2, y2]`` in label-map coordinates (the map spans ``[0, width] x [0, height]``;
    cell ``(i, j)`` covers ``[j, j+1] x [i, i+1]`` and its value sits at its centre ``(j+0.5, i+0.5)``)."""
    b = _as_tensor(boxes).float()
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) [top, left, height, width] fractions, got {tuple(b.shape)}")
    top, left, h, w = b.unbind(1)
    return torch.stack([left * width, top * height, (left + w) * width, (top + h) * height], dim=1)


def relabel_targets(values: ArrayLike, indices: ArrayLike | None, boxes: ArrayLike,
                    num_classes: int | None = None) -> torch.Tensor:
    """ReLabel's label of each crop: float32 ``(K, C)`` class probabilities.

    ``values``/``indices``: the label map as top-k, ``(h, w, k)`` shared by all boxes (the views of
    one image) or ``(K, h, w, k)`` one map per box, with ``num_classes`` = C; or, with
    ``indices=None``, a dense map ``(C, h, w)`` or ``(K, C, h, w)``.  ``boxes``: ``(K, 4)``
    ``[top, left, height, width]`` as fractions of the image (a view's parameters' crop box).

    Steps (ReLabel's LabelPooling): the dense map is rebuilt with zeros outside the top-k;
    ``torchvision.ops.roi_align`` pools each box to a 1x1 output with ``spatial_scale=1`` (the box
    is given in map coordinates, :func:`box_rois`), ``aligned=True`` (sample positions shifted by
    -0.5 so a cell's value sits at its centre -- the same positions as ReLabel's manual ``- 0.5``
    with ``aligned=False``) and ``sampling_ratio=-1`` (``ceil(box side)`` bilinear samples per
    axis, averaged); then softmax over classes (temperature 1).  A horizontal flip does not change
    a 1x1 pooled label, so it needs no handling.  Inputs may be numpy arrays or tensors; the
    result is on the values' device.
    """
    from torchvision.ops import roi_align

    if indices is None:
        dense = _as_tensor(values).float()
    else:
        if num_classes is None:
            raise ValueError("num_classes is needed with top-k indices")
        dense = dense_from_topk(values, indices, int(num_classes))
    if dense.ndim not in (3, 4):
        raise ValueError(f"label map must be (C, h, w) or (K, C, h, w), got {tuple(dense.shape)}")
    rois = box_rois(boxes, dense.shape[-2], dense.shape[-1]).to(dense.device)
    K = rois.shape[0]
    if dense.ndim == 3:
        dense, batch = dense.unsqueeze(0), torch.zeros(K, 1, device=dense.device)
    else:
        if dense.shape[0] != K:
            raise ValueError(f"{dense.shape[0]} label maps for {K} boxes")
        batch = torch.arange(K, device=dense.device, dtype=torch.float32).unsqueeze(1)
    pooled = roi_align(dense, torch.cat([batch, rois], dim=1), output_size=(1, 1), spatial_scale=1.0,
                       sampling_ratio=-1, aligned=True)
    return torch.softmax(pooled.flatten(1), dim=1)


# ============================================================================ the label-map store


def weights_digest(model: nn.Module) -> str:
    """sha256 (16 hex digits) of a model's state dict: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def teacher_identity(model: Encoder) -> dict:
    """What a label-map store records about its teacher (compared on resume)."""
    s = model.spec
    return {"arch": s.arch, "stem": s.stem, "num_classes": s.num_classes, "input_size": s.input_size,
            "mean": list(s.mean), "std": list(s.std), "interpolation": s.interpolation,
            "weights": weights_digest(model)}


def record_dtype(height: int, width: int, k: int) -> np.dtype:
    """One image's record: ``indices`` int16 ``(h, w, k)`` then ``values`` float16 ``(h, w, k)``."""
    return np.dtype([("indices", "<i2", (height, width, k)), ("values", "<f2", (height, width, k))])


_RANK_SKIPPED = re.compile(r"^skipped-rank\d+\.json$")


def _rank_skipped(rank: int) -> str:
    """Skipped images found by writer ``rank`` (merged into ``skipped.json`` by finalize)."""
    return f"skipped-rank{int(rank)}.json"


def _own_file(name: str) -> bool:
    base = name.split(".tmp.")[0]
    return base in _FILES or bool(_RANK_SKIPPED.match(base))


def _mismatch(old: dict, want: dict) -> list[str]:
    out = []
    for key in ("format", "version", "num_images"):
        if old.get(key) != want[key]:
            out.append(f"{key}: {old.get(key)!r} -> {want[key]!r}")
    out += [f"identity.{d}: {L.get_dotted(old.get('identity'), d)!r} -> {L.get_dotted(want['identity'], d)!r}"
            for d in L.diff_keys(old.get("identity"), want["identity"])]
    return out


class _WholeImages(Dataset):
    """Item ``g`` -> ``[(index, uint8 (3, S, S) | None, error | None)]`` for the images of group ``g``:
    each whole image resized to ``S x S`` (aspect ratio not kept, so a crop box's fractions of the
    image are the same fractions of the map)."""

    def __init__(self, base, groups: list[np.ndarray], size: int, interpolation: str):
        from torchvision.transforms import InterpolationMode

        self.base, self.groups, self.size = base, groups, size
        self.interp = {"bicubic": InterpolationMode.BICUBIC, "nearest": InterpolationMode.NEAREST}.get(
            interpolation, InterpolationMode.BILINEAR)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int):
        from torchvision.transforms.v2 import functional as TF

        out = []
        for i in self.groups[g]:
            img, err = load_uint8(self.base, int(i))
            if img is not None:
                img = TF.resize(img, [self.size, self.size], interpolation=self.interp, antialias=True)
            out.append((int(i), img, err))
        return out


@dataclass
class LabelMapStats:
    """What one :func:`write_label_maps` call did."""

    images: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _provenance() -> dict:
    try:
        from .cli import git_sha

        sha = git_sha()
    except Exception:  # informative only
        sha = "unknown"
    return {"command": shlex.join(sys.argv), "git_sha": sha}


def _wanted(model: Encoder, dataset, k: int, input_size: int | None, device: torch.device) -> tuple[dict, np.dtype]:
    """The header fields a store for these settings must have (and its record dtype); checks them
    and probes the teacher once for the map size (and a usable head)."""
    if k < 1:
        raise ConfigError(f"--topk must be >= 1, got {k}")
    C = int(model.spec.num_classes)
    classifier_weights(model)  # a clear error for teachers without a linear classifier
    if C > MAX_CLASSES:
        raise ConfigError(f"the teacher has {C} classes; int16 label-map indices hold at most {MAX_CLASSES}")
    if k > C:
        raise ConfigError(f"--topk {k} is more than the teacher's {C} classes")
    S = int(input_size or model.spec.input_size)
    if S < 1:
        raise ConfigError(f"--input-size must be >= 1, got {S}")
    model.eval()
    probe = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        _, _, h, w = dense_scores(model, probe).shape  # the map size; also checks the head
    except RuntimeError as e:
        raise ConfigError(f"--input-size {S}: teacher {model.spec.arch} cannot run at this size ({e})") from e
    identity = {
        "teacher": teacher_identity(model),
        "dataset": {"fingerprint": dataset.fingerprint(), "split": getattr(dataset, "split", None),
                    "num_images": len(dataset)},
        "maps": {"input_size": S, "interpolation": model.spec.interpolation, "k": int(k), "num_classes": C,
                 "height": int(h), "width": int(w), "values": "float16 scores (logits)", "indices": "int16"},
    }
    want = {"format": FORMAT, "version": VERSION, "identity": L.normalise(identity, "label-map identity"),
            "num_images": len(dataset)}
    return want, record_dtype(h, w, k)


def _check_header(path: Path, want: dict) -> None:
    diff = _mismatch(L.read_json(path / HEADER), want)
    if diff:
        raise ConfigError(f"label maps {path} were made with other settings ({'; '.join(diff[:6])}"
                          f"{'; ...' if len(diff) > 6 else ''}); use another --out, or --overwrite to replace them")


def prepare_label_maps(model: Encoder, dataset, path: str | os.PathLike, *, k: int = 5,
                       input_size: int | None = None, overwrite: bool = False, provenance: dict | None = None,
                       device: str | torch.device | None = None) -> dict:
    """Create the label-map folder ``path`` for these settings, or check the one there (one process,
    before any writer starts: rank 0 under ``torchrun``).  Returns the header.

    Refuses (ConfigError naming the differing keys) a folder made with another teacher, dataset,
    input size or k unless ``overwrite``, which deletes only the label-map files.  Removes
    temporary leftovers of killed writes.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    want, dtype = _wanted(model, dataset, k, input_size, device)
    return _prepare(Path(path), want, dtype, overwrite, provenance)


def _prepare(path: Path, want: dict, dtype: np.dtype, overwrite: bool, provenance: dict | None) -> dict:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"label-map path {path} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    if (path / HEADER).exists():
        try:
            _check_header(path, want)
        except (ConfigError, DataError):
            if not overwrite:
                raise
            for name in os.listdir(path):
                if _own_file(name):
                    (path / name).unlink()
    elif (path / MAPS).exists() or (path / DONE).exists():
        if not overwrite:
            raise ConfigError(f"label maps {path} have data files but no {HEADER}; use another --out or --overwrite")
        for name in os.listdir(path):
            if _own_file(name):
                (path / name).unlink()
    for name in os.listdir(path):  # leftovers of writes killed before their rename
        if ".tmp." in name and _own_file(name):
            (path / name).unlink(missing_ok=True)
    if not (path / HEADER).exists():
        header = {**want, "record_dtype": L.dtype_to_json(dtype), "bytes_per_image": dtype.itemsize,
                  "provenance": L.normalise(provenance if provenance is not None else _provenance(), "provenance")}
        L.write_json_atomic(path / HEADER, header)
    if not (path / DONE).exists():  # the done mask is created last: without it nothing was committed
        L.create_npy(path / MAPS, dtype, (want["num_images"],))
        L.create_npy(path / DONE, np.dtype(np.uint8), (want["num_images"],))
    return L.read_json(path / HEADER)


def write_label_maps(model: Encoder, dataset, path: str | os.PathLike, *, k: int = 5, input_size: int | None = None,
                     batch_size: int = 32, workers: int = 0, device: str | torch.device = "cpu", amp: bool = True,
                     overwrite: bool = False, show_progress: bool = True, provenance: dict | None = None,
                     rank: int = 0, world_size: int = 1) -> LabelMapStats:
    """Run the classifier teacher ``model`` once over every image of ``dataset`` and store its label maps.

    Each whole image is resized to ``input_size`` (default the teacher's) with the teacher's
    interpolation, normalised with its mean/std, and mapped by :func:`dense_scores` to
    ``(C, h, w)``; the top-``k`` scores per location are kept (int16 indices, float16 scores, in
    descending order).  ``path`` is a folder (format: ``docs/relabel.md``).

    Images go through the teacher in fixed groups of ``batch_size`` consecutive images (group
    ``g`` = images ``[g*B, (g+1)*B)``), so the maps do not depend on interruptions or on how many
    processes wrote them.  A record is flushed before its image's done flag; a kill at any moment
    loses at most the group being written, and a rerun computes exactly the missing images (in
    their groups, never rewriting a written image).  Unreadable images are recorded as skipped.
    ``amp``: bfloat16/float16 autocast on CUDA (the classifier runs in float32).

    One process (``world_size == 1``): prepares the folder (:func:`prepare_label_maps`: refusing
    other settings unless ``overwrite``), writes, and finalizes (:func:`finalize_label_maps`:
    ``manifest.json`` with sha256 checksums, last).  Several processes on one node
    (``torchrun``): rank 0 calls :func:`prepare_label_maps` first; then every rank calls this
    with its ``rank`` / ``world_size`` and writes the groups ``g`` with ``g % world_size ==
    rank`` into the shared memory map; after a barrier rank 0 calls :func:`finalize_label_maps`.
    """
    from .progress import bar

    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    path = Path(path)
    want, dtype = _wanted(model, dataset, k, input_size, device)
    if world_size == 1:
        _prepare(path, want, dtype, overwrite, provenance)
    else:
        if not (path / HEADER).exists() or not (path / DONE).exists():
            raise ConfigError(f"label maps {path} are not prepared: rank 0 calls prepare_label_maps first")
        _check_header(path, want)
    t0 = time.time()
    if (path / MANIFEST).exists():
        return LabelMapStats(0, 0, time.time() - t0)
    N = len(dataset)
    S = int(want["identity"]["maps"]["input_size"])
    maps = L.open_npy(path / MAPS, "r+", dtype, (N,))
    done = L.open_npy(path / DONE, "r+", np.dtype(np.uint8), (N,))
    skip_file = path / _rank_skipped(rank)
    skipped = {int(e["index"]): e for e in L.read_json(skip_file)} if skip_file.exists() else {}
    missing = np.asarray(done) == DONE_NOT
    groups = [np.arange(g0, min(g0 + batch_size, N), dtype=np.int64) for g0 in range(0, N, batch_size)
              if (g0 // batch_size) % world_size == rank and missing[g0:g0 + batch_size].any()]
    loader = DataLoader(_WholeImages(dataset, groups, S, model.spec.interpolation), batch_size=None, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers > 0 else None)
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    n_img = n_skip = 0
    pbar = bar(int(sum(missing[g].sum() for g in groups)), "label maps", "img", enabled=show_progress and rank == 0)
    try:
        for items in loader:
            todo = [(i, x) for i, x, err in items if err is None]
            if todo:
                x = normalize(torch.stack([x for _, x in todo]).to(device, non_blocking=True),
                              model.spec.mean, model.spec.std)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=cuda and amp):
                    scores = dense_scores(model, x)  # (B, C, h, w) float32
                vals, idx = scores.topk(dtype["values"].shape[-1], dim=1)  # (B, k, h, w), descending
                vals = vals.permute(0, 2, 3, 1).cpu().numpy().astype(np.float16)
                idx = idx.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16)
                if not np.isfinite(vals).all():
                    raise DataError(f"teacher scores for images {[i for i, _ in todo][:4]} are not finite in float16")
                sel = [j for j, (i, _) in enumerate(todo) if missing[i]]  # never rewrite written images
                rows = np.array([todo[j][0] for j in sel], dtype=np.int64)
                if len(rows):
                    batch = np.empty(len(rows), dtype=dtype)
                    batch["indices"], batch["values"] = idx[sel], vals[sel]
                    maps[rows] = batch
                    maps.flush()
                    done[rows] = DONE_WRITTEN
                    done.flush()
                    n_img += len(rows)
            bad = [(i, err) for i, _, err in items if err is not None and missing[i]]
            if bad:
                for i, err in bad:
                    skipped[i] = {"index": i, "path": dataset.source(i), "reason": err}
                L.write_json_atomic(skip_file, [skipped[i] for i in sorted(skipped)])  # the list, then the flags
                done[[i for i, _ in bad]] = DONE_SKIPPED
                done.flush()
                n_skip += len(bad)
            pbar.update(sum(1 for i, _, _ in items if missing[i]))
            pbar.set_postfix(img_s=f"{n_img / max(time.time() - t0, 1e-9):.1f}", skipped=n_skip, refresh=False)
    finally:
        pbar.close()
    maps.flush()
    del maps, done
    if world_size == 1:
        finalize_label_maps(path)
    return LabelMapStats(n_img, n_skip, time.time() - t0)


def finalize_label_maps(path: str | os.PathLike) -> dict:
    """Write ``manifest.json`` once every image is written or skipped (rank 0, after the writers).

    Merges the writers' skipped lists into ``skipped.json``, checksums ``maps.npy``, ``done.npy``
    and ``skipped.json`` (bytes + sha256) and writes the manifest atomically, last.  The result
    depends only on the settings and the data, not on how the maps were written.  Returns the
    manifest; DataError if images are still missing.
    """
    path = Path(path)
    header = L.read_json(path / HEADER)
    N = int(header["num_images"])
    flags = np.array(L.open_npy(path / DONE, "r", np.dtype(np.uint8), (N,)))
    if (flags == DONE_NOT).any():
        raise DataError(f"label maps {path}: {int((flags == DONE_NOT).sum())} of {N} images are still missing; "
                        f"rerun the command that writes them")
    entries: dict[int, dict] = {}
    rank_files = sorted(n for n in os.listdir(path) if _RANK_SKIPPED.match(n))
    for name in ([SKIPPED] if (path / SKIPPED).exists() else []) + rank_files:
        entries.update({int(e["index"]): e for e in L.read_json(path / name)})
    marked = set(np.nonzero(flags == DONE_SKIPPED)[0].tolist())
    lost = marked - set(entries)
    if lost:
        raise DataError(f"label maps {path}: the skipped lists lack images {sorted(lost)[:5]}")
    skipped = [entries[i] for i in sorted(marked)]
    L.write_json_atomic(path / SKIPPED, skipped)
    for name in rank_files:
        (path / name).unlink()
    manifest = {**header, "complete": True, "num_skipped": len(skipped), "skipped": skipped,
                "files": {name: L.file_entry(path / name) for name in (MAPS, DONE, SKIPPED)}}
    L.write_json_atomic(path / MANIFEST, manifest)
    return manifest


class LabelMaps:
    """A finished label-map store opened for reading (:meth:`open`); memory-mapped lazily per
    process, so it is safe to share with forked or spawned DataLoader workers (``__getstate__``
    drops the map).

    Attributes: ``path``, ``manifest``, ``identity``, ``num_images`` N, ``num_classes`` C, ``k``,
    ``height`` h, ``width`` w, ``input_size``, ``skipped`` (frozenset of image indices).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.identity: dict = manifest["identity"]
        m = self.identity["maps"]
        self.num_images: int = int(manifest["num_images"])
        self.num_classes: int = int(m["num_classes"])
        self.k: int = int(m["k"])
        self.height: int = int(m["height"])
        self.width: int = int(m["width"])
        self.input_size: int = int(m["input_size"])
        self.dtype = record_dtype(self.height, self.width, self.k)
        self.skipped: frozenset[int] = frozenset(int(e["index"]) for e in manifest["skipped"])
        self._mm: np.memmap | None = None
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False, dataset=None) -> "LabelMaps":
        """Open the label maps at ``path``: format, version, completeness and file sizes (DataError
        naming the file otherwise); ``verify=True`` also recomputes the sha256 checksums;
        ``dataset``: :meth:`check_dataset` against it."""
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"label maps {path} do not exist")
        if not (path / MANIFEST).exists():
            if (path / HEADER).exists():
                raise DataError(f"label maps {path} are not finished (no {MANIFEST}); "
                                f"rerun the command that writes them")
            raise DataError(f"{path} holds no label maps (no {MANIFEST})")
        m = L.read_json(path / MANIFEST)
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DataError(f"{path / MANIFEST} is not a label-map manifest")
        if m.get("version") != VERSION:
            raise DataError(f"{path / MANIFEST} has label-map format version {m.get('version')} "
                            f"(this fkd_ssl reads {VERSION})")
        if not m.get("complete"):
            raise DataError(f"{path / MANIFEST} describes unfinished label maps")
        for name, meta in (m.get("files") or {}).items():
            f = path / name
            if not f.exists():
                raise DataError(f"label-map file {f} is missing")
            if f.stat().st_size != meta["bytes"]:
                raise DataError(f"label-map file {f} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}")
        try:
            maps = cls(path, m)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path / MANIFEST} is corrupt (bad or missing field {e})") from None
        if verify:
            maps.verify()
        if dataset is not None:
            maps.check_dataset(dataset)
        return maps

    @property
    def teacher(self) -> dict:
        """The teacher's identity (arch, classes, input size, normalisation, weights digest)."""
        return self.identity["teacher"]

    def verify(self) -> None:
        """Recompute every file's sha256; DataError naming the first file that differs."""
        for name, meta in self.manifest["files"].items():
            if L.file_sha256(self.path / name) != meta["sha256"]:
                raise DataError(f"label-map file {self.path / name} does not match its checksum "
                                f"in {self.path / MANIFEST}")

    def nbytes(self) -> int:
        """Bytes of the checksummed files."""
        return sum(int(meta["bytes"]) for meta in self.manifest["files"].values())

    def valid_indices(self) -> np.ndarray:
        """int64: the images that have a label map (ascending)."""
        keep = np.ones(self.num_images, dtype=bool)
        keep[list(self.skipped)] = False
        return np.nonzero(keep)[0].astype(np.int64)

    def check_dataset(self, dataset, flag: str = "--label-map") -> None:
        """ConfigError naming ``flag`` if the maps were made from another dataset than ``dataset``."""
        have = self.identity["dataset"]
        if have.get("fingerprint") != dataset.fingerprint() or self.num_images != len(dataset):
            raise ConfigError(f"{flag} {self.path} holds label maps of another dataset (fingerprint "
                              f"{have.get('fingerprint')}, {self.num_images} images) than {dataset.name} (fingerprint "
                              f"{dataset.fingerprint()}, {len(dataset)} images); make them for this data with "
                              f"experiments/gen_label_map.py")

    def _map(self) -> np.memmap:
        if self._mm is None or os.getpid() != self._pid:
            self._mm = L.open_npy(self.path / MAPS, "r", self.dtype, (self.num_images,))
            self._pid = os.getpid()
        return self._mm

    def read_batch(self, indices: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """``(values float32 (B, h, w, k), indices int64 (B, h, w, k))`` of images ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image index out of range 0..{self.num_images - 1}")
        bad = [int(i) for i in idx if int(i) in self.skipped]
        if bad:
            raise DataError(f"image {bad[0]} has no label map (it was unreadable when {self.path} was written)")
        rec = self._map()[idx]
        return rec["values"].astype(np.float32), rec["indices"].astype(np.int64)

    def read(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values float32 (h, w, k), indices int64 (h, w, k))`` of one image."""
        v, i = self.read_batch(np.array([image]))
        return v[0], i[0]

    def dense(self, image: int) -> torch.Tensor:
        """float32 ``(C, h, w)``: the image's map with zeros outside the top-k."""
        v, i = self.read(image)
        return dense_from_topk(v, i, self.num_classes)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"] = None  # reopened in the receiving process
        return state

    def __repr__(self) -> str:
        return (f"LabelMaps({str(self.path)!r}, N={self.num_images}, C={self.num_classes}, "
                f"map={self.height}x{self.width}, k={self.k})")


# ============================================================================ the view source


class RelabelViews(FreshViews):
    """Fresh RandomResizedCrop views every epoch (as :class:`~fkd_ssl.replay.FreshViews`: slots
    ``FRESH_SLOT_BASE + epoch*K + v`` of ``cfg``, so the same views as a FreshViews with the same
    seed) whose targets are their ReLabel labels from ``maps``:

    ``take(image, epoch, height, width) -> (slots int64 (K,), params float32 (K, P), targets float32 (K, C))``.

    ``needs_size = True`` (the image size is needed to sample boxes); ``target_dim`` = C.  Plugs
    into :class:`fkd_ssl.replay.ReplayDataset` unchanged; pass the same ``cfg`` as its
    ``teacher_cfg`` (only its geometry matters for the labels).
    """

    needs_size = True

    def __init__(self, maps: LabelMaps, cfg: ViewConfig, k: int, seed: int):
        super().__init__(cfg, k, seed)
        self.maps = maps

    @property
    def target_dim(self) -> int:  # type: ignore[override]
        return self.maps.num_classes

    def take(self, image: int, epoch: int, height: int | None = None, width: int | None = None):
        if height is None or width is None:
            raise ValueError("RelabelViews.take needs the image's height and width")
        slots, params, _ = super().take(image, epoch, height, width)
        values, indices = self.maps.read(image)
        targets = relabel_targets(values, indices, params[:, _BOX], self.maps.num_classes)
        return slots, params, targets.numpy().astype(np.float32, copy=False)
