"""ReLabel's label maps, kept in a target store: per image the teacher's top-k class scores at every
location (R = 1, fields ``indices`` int16 and ``values`` float16 (h, w, k)).  Format: ``docs/relabel.md``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from ..checkpoint import weights_digest
from ..data.image_io import load_uint8
from ..data.sampler import group_loader
from ..errors import ConfigError, DataError
from ..models import Encoder
from ..progress import bar
from ..replay import FreshViews
from ..store import FieldsCodec, StoreIdentity, StoreWriter, TargetStore, finalize, owned_shards
from ..store import layout as L
from ..views import PARAM_FIELDS, ViewConfig, normalize
from .targets import ArrayLike, classifier_weights, dense_scores, relabel_targets

#: the largest class count int16 indices can hold
MAX_CLASSES = int(np.iinfo(np.int16).max) + 1
#: fields of a view's parameter vector that hold its crop box (fractions of the image)
BOX_FIELDS = ("y", "x", "h", "w")
_BOX = [PARAM_FIELDS.index(f) for f in BOX_FIELDS]
_OLD_MAPS = "maps.npy"  # the one memory-mapped file of label maps written before they were a store


def _refuse_old_format(path: Path) -> None:
    if (path / _OLD_MAPS).exists():
        raise DataError(f"label maps {path} are in an old format ({_OLD_MAPS}) this fkd_ssl no longer reads; "
                        f"delete the folder and regenerate them with experiments/gen_label_map.py")


def label_map_spec(model: Encoder, dataset, k: int, input_size: int | None,
                   device: torch.device) -> tuple[StoreIdentity, FieldsCodec]:
    """The store identity and codec of label maps for these settings; checks them and probes the
    teacher once for the map size (and a usable head)."""
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
    probe = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        _, _, h, w = dense_scores(model.eval(), probe).shape  # the map size; also checks the head
    except RuntimeError as e:
        raise ConfigError(f"--input-size {S}: teacher {model.spec.arch} cannot run at this size ({e})") from e
    maps = {"input_size": S, "interpolation": model.spec.interpolation, "k": int(k), "num_classes": C,
            "height": int(h), "width": int(w), "values": "float16 scores (logits)", "indices": "int16"}
    s = model.spec  # the teacher as label maps record it (compared on resume)
    teacher = {"arch": s.arch, "stem": s.stem, "num_classes": s.num_classes, "input_size": s.input_size,
               "mean": list(s.mean), "std": list(s.std), "interpolation": s.interpolation,
               "weights": weights_digest(model)}
    identity = StoreIdentity(teacher=teacher, extra={"maps": maps}, dataset={
        "fingerprint": dataset.fingerprint(), "split": getattr(dataset, "split", None), "num_images": len(dataset)})
    return identity, FieldsCodec([["indices", "<i2", [h, w, k]], ["values", "<f2", [h, w, k]]])


def open_label_map_writer(model: Encoder, dataset, path: str | os.PathLike, *, k: int = 5,
                          input_size: int | None = None, shard_size: int = 4096, overwrite: bool = False,
                          shards=None, provenance: dict | None = None,
                          device: str | torch.device | None = None) -> StoreWriter:
    """Create the label-map store at ``path`` for these settings, or resume the one there
    (:meth:`StoreWriter.create_or_resume`: other settings are refused unless ``overwrite``).
    Under ``torchrun`` rank 0 calls this first with ``shards=[]``."""
    path = Path(path)
    _refuse_old_format(path)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    identity, codec = label_map_spec(model, dataset, k, input_size, device)
    return StoreWriter.create_or_resume(path, identity, num_images=len(dataset), views_per_image=1, param_dim=0,
                                        target_dim=int(model.spec.num_classes), codec=codec, shard_size=shard_size,
                                        overwrite=overwrite, shards=shards, provenance=provenance)


def _whole_images(base, size: int, interpolation: str, group: np.ndarray) -> list:
    """``[(index, uint8 (3, S, S) | None, error | None)]`` for the images of ``group``: each whole image
    resized to ``S x S`` (aspect ratio not kept, so a crop box's fractions of the image are the same
    fractions of the map)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    interp = {"bicubic": InterpolationMode.BICUBIC, "nearest": InterpolationMode.NEAREST}.get(
        interpolation, InterpolationMode.BILINEAR)
    out = []
    for i in group:
        img, err = load_uint8(base, int(i))
        if img is not None:
            img = TF.resize(img, [size, size], interpolation=interp, antialias=True)
        out.append((int(i), img, err))
    return out


@dataclass
class LabelMapStats:
    """What one :func:`write_label_maps` call did."""

    images: int
    skipped: int
    seconds: float


@torch.no_grad()
def topk_maps(model: Encoder, images: list[torch.Tensor], k: int, device: torch.device,
              amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (3, S, S) -> their label maps: (indices int16 (B, h, w, k), values float16
    (B, h, w, k)), the top-``k`` scores per location in descending order."""
    x = normalize(torch.stack(images).to(device, non_blocking=True), model.spec.mean, model.spec.std)
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast(device.type, dtype=amp_dtype, enabled=cuda and amp):
        vals, idx = dense_scores(model, x).topk(k, dim=1)  # (B, k, h, w), descending
    vals = vals.permute(0, 2, 3, 1).cpu().numpy().astype(np.float16)
    if not np.isfinite(vals).all():
        raise DataError(f"teacher scores for {len(images)} images are not finite in float16")
    return idx.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16), vals


def fill_label_maps(model: Encoder, dataset, writer: StoreWriter, *, batch_size: int = 32, workers: int = 0,
                    device: str | torch.device = "cpu", amp: bool = True, show_progress: bool = True) -> LabelMapStats:
    """Compute and write the maps of the images ``writer`` still misses, in fixed groups of ``batch_size``."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    device, t0 = torch.device(device), time.time()
    spec = writer.identity.extra["maps"]
    missing = writer.missing_images()
    todo = np.zeros(writer.num_images, dtype=bool)
    todo[missing] = True
    groups = [np.arange(g * batch_size, min((g + 1) * batch_size, writer.num_images))
              for g in np.unique(missing // batch_size)]
    loader = group_loader(partial(_whole_images, dataset, spec["input_size"], model.spec.interpolation), groups,
                          workers, pin_memory=device.type == "cuda")
    n_img = n_skip = 0
    with bar(len(missing), "label maps", "img", enabled=show_progress) as pbar:
        for items in loader:
            ok = [(i, x) for i, x, err in items if err is None]
            if ok:  # the whole group through the teacher, only missing images written
                idx, vals = topk_maps(model, [x for _, x in ok], spec["k"], device, amp)
                sel = [j for j, (i, _) in enumerate(ok) if todo[i]]
                writer.write_encoded(np.array([ok[j][0] for j in sel], dtype=np.int64),
                                     np.zeros((len(sel), 1, 0), np.float32),
                                     {"indices": idx[sel, None], "values": vals[sel, None]})
                n_img += len(sel)
            for i, _, err in items:
                if err is not None and todo[i]:
                    writer.skip(i, dataset.source(i), err)
                    n_skip += 1
            pbar.update(int(sum(todo[i] for i, _, _ in items)))
            pbar.set_postfix(img_s=f"{n_img / max(time.time() - t0, 1e-9):.1f}", skipped=n_skip, refresh=False)
    return LabelMapStats(n_img, n_skip, time.time() - t0)


def write_label_maps(model: Encoder, dataset, path: str | os.PathLike, *, k: int = 5, input_size: int | None = None,
                     batch_size: int = 32, workers: int = 0, device: str | torch.device = "cpu", amp: bool = True,
                     overwrite: bool = False, show_progress: bool = True, provenance: dict | None = None,
                     shard_size: int = 4096, rank: int = 0, world_size: int = 1) -> LabelMapStats:
    """Run the classifier teacher ``model`` once over every whole image of ``dataset`` and store its label maps
    (under ``torchrun`` every rank calls this after :func:`open_label_map_writer`; rank 0 finalizes)."""
    device = torch.device(device)
    model = model.to(device).eval().requires_grad_(False)
    shards = owned_shards(L.num_shards(len(dataset), shard_size), rank, world_size)
    writer = open_label_map_writer(model, dataset, path, k=k, input_size=input_size, shard_size=shard_size,
                                   overwrite=overwrite, shards=shards, provenance=provenance, device=device)
    stats = fill_label_maps(model, dataset, writer, batch_size=batch_size, workers=workers, device=device, amp=amp,
                            show_progress=show_progress and rank == 0)
    writer.complete_owned()
    writer.close()
    if world_size == 1 and not (Path(path) / L.MANIFEST).exists():
        finalize(path)
    return stats


class LabelMaps(TargetStore):
    """Finished label maps opened for reading (:meth:`open`): a :class:`TargetStore` that knows the maps' shape."""

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False, dataset=None) -> "LabelMaps":  # type: ignore[override]
        """Open the label maps at ``path`` (the store's checks; ``verify=True`` recomputes the
        checksums); ``dataset``: :meth:`check_dataset` against it."""
        _refuse_old_format(Path(path))
        maps = super().open(path, verify=verify)
        if maps.codec.name != "fields" or "maps" not in maps.identity.extra:
            raise DataError(f"{path} is a target store, not label maps (those are made by experiments/gen_label_map.py)")
        if dataset is not None:
            maps.check_dataset(dataset)
        return maps

    @property
    def num_classes(self) -> int:
        return self.target_dim

    @property
    def teacher(self) -> dict:
        """The teacher's identity (arch, classes, input size, normalisation, weights digest)."""
        return self.identity.teacher

    @property
    def input_size(self) -> int:
        return int(self.identity.extra["maps"]["input_size"])

    @property
    def height(self) -> int:
        return self.dtype["indices"].shape[0]

    @property
    def width(self) -> int:
        return self.dtype["indices"].shape[1]

    @property
    def k(self) -> int:
        return self.dtype["indices"].shape[2]

    def check_dataset(self, dataset, flag: str = "--label-map") -> None:
        """ConfigError naming ``flag`` if the maps were made from another dataset than ``dataset``."""
        from ..distill import check_made_from

        check_made_from(self, dataset, flag, "label maps", "experiments/gen_label_map.py")

    def topk_batch(self, indices: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """``(values float32 (B, h, w, k), indices int64 (B, h, w, k))`` of images ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rec = self.records(idx, np.zeros_like(idx))
        return rec["values"].astype(np.float32), rec["indices"].astype(np.int64)

    def topk(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values float32 (h, w, k), indices int64 (h, w, k))`` of one image."""
        v, i = self.topk_batch(np.array([image]))
        return v[0], i[0]

    def __repr__(self) -> str:
        return (f"LabelMaps({str(self.path)!r}, N={self.num_images}, C={self.num_classes}, "
                f"map={self.height}x{self.width}, k={self.k})")


class RelabelViews(FreshViews):
    """Fresh RandomResizedCrop views every epoch (the slots a :class:`~fkd_ssl.replay.FreshViews` with the same
    seed takes) whose targets are their ReLabel labels from ``maps``; a source for ReplayDataset."""

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
        values, indices = self.maps.topk(image)
        targets = relabel_targets(values, indices, params[:, _BOX], self.maps.num_classes)
        return slots, params, targets.numpy().astype(np.float32, copy=False)
