"""The published FKD soft-label layout (one ``torch.save`` file per image) <-> target stores.

Layout, geometry and limits: ``docs/store.md``, "Published FKD soft labels".
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.datasets import ImageFolderDataset
from ..data.sampler import group_loader
from ..errors import ConfigError, DataError
from ..fileio import atomic_path, read_json, write_json_atomic
from ..progress import bar
from ..store import StoreIdentity, StoreWriter, TargetStore, TopKCodec, finalize
from ..store import layout as L
from ..store.codecs import f16_toward_zero
from ..views import PARAM_FIELDS, VIEW_PARAM_DIM, ViewConfig

LABEL_SUFFIX = ".tar"
EXPORT_MARKER = "fkd_ssl_export.json"
EXPORT_FORMAT = "fkd_ssl.fkd_export"
IMPORT_CHUNK = 16
FP16_MAX_CLASSES = 2048

_FLIP = PARAM_FIELDS.index("flip")


def label_relpath(image_rel: str, split: str) -> str:
    """Where FKD keeps one image's labels: ``"n0144/x_1.JPEG"`` -> ``"train/n0144/x_1.tar"``."""
    parts = PurePath(image_rel).parts
    if not parts:
        raise DataError(f"empty image path for split {split}")
    return "/".join((split, *parts[:-1], parts[-1].split(".")[0] + LABEL_SUFFIX))


def label_relpaths(image_rels: Sequence[str], split: str) -> list[str]:
    """:func:`label_relpath` of every image; DataError naming both images if two share a label file."""
    out, seen = [], {}
    for rel in image_rels:
        lab = label_relpath(rel, split)
        if lab in seen:
            raise DataError(f"images {seen[lab]} and {rel} would share the FKD label file {lab} "
                            f"(FKD names a label file by the image name up to its first dot)")
        seen[lab] = rel
        out.append(lab)
    return out


def resolve_fkd_root(folder: str | os.PathLike, split: str) -> Path:
    """The soft-label folder holding ``<split>/``: ``folder`` itself, or its only subfolder."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"FKD soft-label folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist"))
    if (root / split).is_dir():
        return root
    subs = [e for e in sorted(root.iterdir()) if e.is_dir() and not e.name.startswith(".")]
    if len(subs) == 1 and (subs[0] / split).is_dir():
        return subs[0]
    raise DataError(f"FKD soft-label folder {root} has no {split}/ folder "
                    f"(expected {root}/{split}/<class>/<image name>{LABEL_SUFFIX})")


def scan_label_files(root: Path, split: str) -> dict[str, int]:
    """Every ``*.tar`` under ``root/split``: relative posix path -> size in bytes (sorted)."""
    found: dict[str, int] = {}
    for dirpath, _, filenames in os.walk(root / split, followlinks=True):
        for fn in filenames:
            if fn.endswith(LABEL_SUFFIX) and not fn.startswith("."):
                full = os.path.join(dirpath, fn)
                found[Path(os.path.relpath(full, root)).as_posix()] = os.path.getsize(full)
    return dict(sorted(found.items()))


def match_tree(expected: Sequence[str], present: dict[str, int], root: Path, image_rels: Sequence[str],
               data_name: str) -> None:
    """DataError unless the label files under ``root`` are exactly ``expected`` (one per image)."""
    missing = [(img, lab) for img, lab in zip(image_rels, expected) if lab not in present]
    extra = sorted(set(present) - set(expected))
    parts = []
    if missing:
        img, lab = missing[0]
        parts.append(f"{len(missing)} images have no label file (first: {img}, expected {root / lab})")
    if extra:
        parts.append(f"{len(extra)} label files have no image (first: {root / extra[0]})")
    if parts:
        raise DataError(f"FKD folder {root} does not match the images of --data {data_name}: " + "; ".join(parts))


def numpy_safe_globals() -> list:
    """The allow-list for ``torch.load(weights_only=True)`` of FKD label files (numpy array types)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtype_classes = sorted({type(np.dtype(c)) for c in ("?", "f2", "f4", "f8", "i1", "i2", "i4", "i8",
                                                          "u1", "u2", "u4", "u8")}, key=str)
    return [np.ndarray, np.dtype, *dtype_classes,
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]


def _safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`numpy_safe_globals`; DataError naming the file."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise ConfigError("reading FKD label files needs torch >= 2.5 (torch.serialization.safe_globals), "
                          f"found torch {torch.__version__}")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"FKD label file {path} is missing") from None
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise DataError(f"FKD label file {path} refused: it needs {found[0]}, which is not a numpy array type "
                            f"(unpickling it could run code; nothing from it was executed)") from None
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        reason = " ".join((why.group(1) if why else str(e)).split())[:120]
        raise DataError(f"FKD label file {path} cannot be read as a torch.save file of numpy arrays "
                        f"({reason}; nothing from it was executed)") from None
    except Exception as e:  # truncated zip, not a pickle, ...: any failure here is a bad file
        raise DataError(f"FKD label file {path} cannot be read ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None


@dataclass
class FKDLabels:
    """One image's FKD labels: ``coords`` (R, 4) fractions, ``flips`` (R,), ``indices`` / ``values`` (R, k)."""

    coords: np.ndarray
    flips: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    layout: str
    dtype: str

    @property
    def num_crops(self) -> int:
        return int(self.coords.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def shape(self) -> tuple[int, int, str, str]:
        """(crops, k, layout, dtype): what every file of one store must share."""
        return self.num_crops, self.k, self.layout, self.dtype


def _as_numpy(x: Any) -> np.ndarray | None:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else None


def parse_label_state(obj: Any, path: str | os.PathLike) -> FKDLabels:
    """Check and unpack the object of one label file (see the module docstring)."""
    def bad(why: str) -> DataError:
        return DataError(f"FKD label file {path} is not in the FKD layout ({why}; expected "
                         f"[coords (R,4), flips (R,), labels (R,2,k)])")

    if not isinstance(obj, (list, tuple)) or len(obj) != 3:
        raise bad(f"holds a {type(obj).__name__}" + (f" of {len(obj)} items" if isinstance(obj, (list, tuple)) else ""))
    coords, flips, labels = (_as_numpy(a) for a in obj)
    if coords is None or flips is None or labels is None:
        raise bad("its items are not arrays")
    if coords.ndim != 2 or coords.shape[1] != 4 or coords.dtype.kind != "f":
        raise bad(f"coords are {coords.dtype} {coords.shape}")
    R = coords.shape[0]
    if R < 1:
        raise bad("it holds no crops")
    if flips.shape != (R,) or flips.dtype.kind not in "biuf" or not np.isin(flips, (0, 1)).all():
        raise bad(f"flips are {flips.dtype} {flips.shape} for {R} crops, or not 0/1")
    if labels.shape == (R,) and labels.dtype.kind in "iuf":
        layout, idx, val = "hard", labels.reshape(R, 1), np.ones((R, 1), dtype=np.float32)
    elif labels.shape == (R, 2) and labels.dtype.kind == "f":
        layout, idx, val = "smoothing", labels[:, :1], labels[:, 1:]
    elif labels.ndim == 3 and labels.shape[:2] == (R, 2) and labels.shape[2] >= 1 and labels.dtype.kind == "f":
        layout, idx, val = "marginal", labels[:, 0, :], labels[:, 1, :]
    else:
        raise bad(f"labels are {labels.dtype} {labels.shape} for {R} crops")
    if not np.isfinite(coords).all():
        raise bad("coords hold NaN or inf")
    if not np.isfinite(idx).all() or (np.asarray(idx) != np.round(idx)).any():
        raise bad("class indices are not integers")
    return FKDLabels(coords=np.ascontiguousarray(coords), flips=np.asarray(flips).astype(bool),
                     indices=np.asarray(idx).astype(np.int64), values=np.ascontiguousarray(val), layout=layout,
                     dtype=(labels if labels.dtype.kind == "f" else coords).dtype.name)


def load_label_file(path: str | os.PathLike) -> FKDLabels:
    """Read one FKD label file without executing pickled code."""
    return parse_label_state(_safe_load(Path(path)), path)


def label_type_name(layout: str, k: int, mode: str) -> str:
    """The reference code's ``--soft_label_type`` for a layout and top-k mode."""
    if layout in ("hard", "smoothing"):
        return layout
    return f"marginal_smoothing_k{k}" if mode == "smooth" else "marginal_renorm"


def coords_to_params(coords: np.ndarray, flips: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int]:
    """FKD crops -> (view parameters float32 (R, VIEW_PARAM_DIM), number of boxes clamped into the image).

    The box is the one the reference code crops: ``[top, left, bottom, right]`` pixels, rounded.
    """
    c = np.asarray(coords, dtype=np.float64)
    top, left = c[:, 0] * height, c[:, 1] * width
    box = np.rint(np.stack([top, left, top + c[:, 2] * height, left + c[:, 3] * width], axis=1)).astype(np.int64)
    top, left = np.clip(box[:, 0], 0, height - 1), np.clip(box[:, 1], 0, width - 1)
    bottom, right = np.clip(box[:, 2], top + 1, height), np.clip(box[:, 3], left + 1, width)
    clamped = int((np.stack([top, left, bottom, right], axis=1) != box).any(axis=1).sum())
    p = np.zeros((len(box), VIEW_PARAM_DIM), dtype=np.float32)
    p[:, 0], p[:, 1] = top / height, left / width
    p[:, 2], p[:, 3] = (bottom - top) / height, (right - left) / width
    p[:, _FLIP] = np.asarray(flips).astype(bool)
    return p, clamped


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header (no decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read the size of image {path}: {e}") from None
    return int(h), int(w)


def topk_fields(labels: FKDLabels, num_classes: int, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``topk`` codec fields of one file's labels in the file's order; DataError naming a bad file."""
    idx, val = labels.indices, np.asarray(labels.values, dtype=np.float32)
    bad = idx[(idx < 0) | (idx >= num_classes)]
    if bad.size:
        raise DataError(f"FKD label file {path} has class index {int(bad[0])} outside 0..{num_classes - 1} "
                        f"(pass --num-classes to match the teacher)")
    s = np.sort(idx, axis=1)
    if (s[:, 1:] == s[:, :-1]).any():
        raise DataError(f"FKD label file {path} repeats a class index within a crop")
    if not np.isfinite(val).all() or val.min() < 0 or val.max() > 1 + 1e-3:
        raise DataError(f"FKD label file {path} holds values outside [0, 1] (not probabilities)")
    if float(val.sum(axis=1, dtype=np.float64).max()) > 1 + 1e-2:
        raise DataError(f"FKD label file {path} has a crop whose top-{labels.k} values sum to more than 1")
    return {"idx": idx.astype(np.uint16), "val": f16_toward_zero(val)}


def _read_chunk(image_paths: list[Path], label_paths: list[Path], first: FKDLabels, num_classes: int,
                idx: np.ndarray):
    """Images ``idx`` -> ``(idx, params, fields, clamped, None)``, or ``(idx, None, None, 0, error)`` (in a worker).
    Every file must hold as many crops, the same k, layout and dtype as the ``first`` one (a store's shape)."""
    params, fields, clamped = [], [], 0
    try:
        for i in idx:
            lp = label_paths[int(i)]
            lab = load_label_file(lp)
            if lab.shape != first.shape:
                raise DataError(f"FKD label file {lp} holds {lab.num_crops} crops, k={lab.k}, {lab.layout} labels in "
                                f"{lab.dtype}; the first file holds {first.num_crops} crops, k={first.k}, "
                                f"{first.layout} in {first.dtype} (a store needs the same for every image)")
            p, n = coords_to_params(lab.coords, lab.flips, *_image_size(image_paths[int(i)]))
            params.append(p)
            fields.append(topk_fields(lab, num_classes, lp))
            clamped += n
    except DataError as e:
        return idx, None, None, 0, str(e)
    return idx, np.stack(params), {f: np.stack([x[f] for x in fields]) for f in ("idx", "val")}, clamped, None


@dataclass
class ImportResult:
    """What :func:`import_fkd` did: the store's top-k, and this run's images and clamped boxes."""

    k: int
    num_classes: int
    label_type: str
    written: int
    clamped: int
    already_complete: bool


def image_folder_dataset(dataset):
    """``dataset`` if it is a folder of image files (FKD mirrors an image tree), else ConfigError."""
    if not isinstance(dataset, ImageFolderDataset):
        raise ConfigError(f"--data {dataset.name}: FKD soft labels mirror a tree of image files; use an "
                          f"imagefolder: or synthetic dataset (this one has no image files)")
    return dataset


def import_identity(root: Path, files: dict[str, int], first: FKDLabels, num_classes: int, mode: str,
                    views: ViewConfig, dataset) -> StoreIdentity:
    """The identity of a store imported from FKD folder ``root`` (what a rerun must match)."""
    fp = hashlib.sha256("".join(f"{name}\t{size}\n" for name, size in files.items()).encode()).hexdigest()[:16]
    return StoreIdentity(
        teacher={"imported_from": "fkd", "source": str(root.resolve()), "source_fingerprint": fp,
                 "hash": f"fkd:{fp}", "arch": None, "method": "fkd-import", "target": "probs", "temp": None,
                 "dim": num_classes, "label_type": label_type_name(first.layout, first.k, mode),
                 "file_dtype": first.dtype},
        views=views.to_dict(), extra={"geometry": "fkd-pil-box"},
        dataset={"fingerprint": dataset.fingerprint(), "split": dataset.split, "num_classes": dataset.num_classes})


def import_fkd(folder: str | os.PathLike, dataset, out: str | os.PathLike, *, num_classes: int | None = None,
               mode: str = "smooth", views: ViewConfig | None = None, shard_size: int = 4096, workers: int = 0,
               overwrite: bool = False, show_progress: bool = True,
               log: Callable[[str], None] = print) -> ImportResult:
    """Convert the FKD soft labels of ``dataset``'s images (an image folder) into a ``topk`` store at ``out``."""
    ds = image_folder_dataset(dataset)
    root = resolve_fkd_root(folder, ds.split)
    image_rels = [rel for rel, _ in ds.samples]
    expected = label_relpaths(image_rels, ds.split)
    files = scan_label_files(root, ds.split)
    match_tree(expected, files, root, image_rels, ds.name)
    first = load_label_file(root / expected[0])
    C = int(num_classes or ds.num_classes)
    if first.k > C:
        raise ConfigError(f"FKD labels hold the top {first.k} classes but --num-classes is {C}")
    views = views or ViewConfig(size=224, scale=(0.08, 0.936), photometric=False, interpolation="bicubic")
    if views.photometric:
        raise ConfigError("FKD soft labels hold geometry only: the view config must have photometric=False")
    identity = import_identity(root, files, first, C, mode, views, ds)
    out = Path(out)
    result = ImportResult(first.k, C, identity.teacher["label_type"], 0, 0, True)
    if (out / L.MANIFEST).exists() and not overwrite:
        try:
            done = TargetStore.open(out)
        except DataError:
            done = None
        if done is not None and done.identity == StoreIdentity.of(identity):
            log(f"store {out} is already complete ({done.num_images} images x {done.views_per_image} views)")
            return result
    writer = StoreWriter.create_or_resume(out, identity, num_images=len(ds), views_per_image=first.num_crops,
                                          param_dim=VIEW_PARAM_DIM, target_dim=C, shard_size=shard_size,
                                          codec=TopKCodec(k=first.k, num_classes=C, mode=mode), overwrite=overwrite)
    missing = writer.missing_images()
    chunks = [missing[a:a + IMPORT_CHUNK] for a in range(0, len(missing), IMPORT_CHUNK)]
    read = partial(_read_chunk, [ds.path(i) for i in range(len(ds))], [root / lab for lab in expected], first, C)
    loader = group_loader(read, chunks, workers)
    with bar(len(missing), "import-fkd", "img", enabled=show_progress) as pbar:
        for idx, params, fields, n_clamped, err in loader:
            if err is not None:
                writer.close()
                raise DataError(err)
            writer.write_encoded(np.asarray(idx), params, fields)  # FKD's own top-k, order and values
            result.written += len(idx)
            result.clamped += n_clamped
            pbar.update(len(idx))
    writer.complete_owned()
    writer.close()
    finalize(out)
    result.already_complete = False
    return result


def topk_of_probs(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of probability rows (B, C) by descending value, ties to the lower index (the ``topk`` order)."""
    probs = np.asarray(probs, dtype=np.float32)
    order = np.lexsort((np.broadcast_to(np.arange(probs.shape[1]), probs.shape), -probs), axis=1)[:, :k]
    return order.astype(np.int64), np.take_along_axis(probs, order, axis=1)


def save_label_file(path: Path, params: np.ndarray, indices: np.ndarray, values: np.ndarray, fp16: bool) -> None:
    """Write one FKD label file atomically: ``[coords (R,4), flips (R,), labels (R,2,k)]`` (float16 with
    ``fp16``) of our view parameters (R, P >= 5) and the views' class indices and values (R, k)."""
    ft, params = (np.float16 if fp16 else np.float32), np.asarray(params, dtype=np.float32)
    labels = np.stack([np.asarray(indices, dtype=np.float32), np.asarray(values, dtype=np.float32)], axis=1)
    state = [params[:, :4].astype(ft), params[:, _FLIP] > 0.5, labels.astype(ft)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        torch.save(state, str(tmp))


@dataclass
class ExportResult:
    """What :func:`export_fkd` did: files written by this run, files in all, k, label type."""

    written: int
    files: int
    k: int
    label_type: str
    already_complete: bool


def _export_k(store, k: int | None, fp16: bool) -> int:
    """The k to export (default: a ``topk`` store's k, else 5); ConfigError for a store FKD cannot hold."""
    store_k = int(store.codec.k) if store.codec.name == "topk" else None
    target = (store.identity.teacher or {}).get("target")
    if store_k is None and target != "probs":
        raise ConfigError(f"store {store.path} holds {target or 'unknown'} targets; FKD soft labels are class "
                          f"probabilities (a store of --target probs)")
    if k is None:
        k = store_k if store_k is not None else 5
    if store_k is not None and k > store_k:
        raise ConfigError(f"--topk {k}: store {store.path} keeps only the top {store_k} classes")
    if not 1 <= k <= store.target_dim:
        raise ConfigError(f"--topk must be in 1..{store.target_dim}, got {k}")
    if fp16 and store.target_dim > FP16_MAX_CLASSES:
        raise ConfigError(f"--fp16 stores class indices as float16, exact only up to {FP16_MAX_CLASSES} classes; "
                          f"the store has {store.target_dim}")
    if store.param_dim <= _FLIP:
        raise ConfigError(f"store {store.path} has {store.param_dim} view parameters; FKD needs a crop box and a flip")
    if (store.identity.views or {}).get("photometric"):
        raise ConfigError(f"store {store.path} was made with photometric views (colour jitter, grayscale, blur); "
                          f"FKD soft labels hold only a crop and a flip")
    return k


def export_spec(store, dataset, k: int, fp16: bool) -> dict:
    """What an export folder holds (its marker file; a rerun must match it to resume)."""
    label_type = label_type_name("marginal", k, store.codec.mode if store.codec.name == "topk" else "smooth")
    return {
        "format": EXPORT_FORMAT, "version": 1, "store": str(Path(store.path).resolve()),
        "store_manifest_sha256": L.file_sha256(Path(store.path) / L.MANIFEST),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "split": dataset.split},
        "num_images": store.num_images, "num_crops": store.views_per_image, "k": k,
        "num_classes": store.target_dim, "dtype": "float16" if fp16 else "float32", "label_type": label_type,
        "train_flags": f"--softlabel_path <this folder> --soft_label_type {label_type} --num_classes {store.target_dim}",
    }


def _export_labels(store, i: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(params float32 (R, P), indices int64 (R, k), values float32 (R, k)) of image ``i``."""
    views = np.arange(store.views_per_image)
    if store.codec.name == "topk":
        rec = store.records(np.full(len(views), i), views)
        return np.ascontiguousarray(rec[L.PARAMS_FIELD]), rec["idx"][:, :k].astype(np.int64), \
            rec["val"][:, :k].astype(np.float32)
    params, probs = store.read(np.full(len(views), i), views)
    return (params, *topk_of_probs(probs, k))


def _resume_export(out: Path, spec: dict, overwrite: bool) -> tuple[bool, dict | None]:
    """(whether to resume the export in ``out``, its marker if finished and the same); refuses others."""
    marker = out / EXPORT_MARKER
    if overwrite:
        return False, None
    if not marker.exists():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} is not empty and holds no {EXPORT_MARKER}; use an empty folder, "
                              f"or --overwrite to write into it")
        return False, None
    try:
        old = read_json(marker, "FKD export marker")
    except DataError as e:
        raise DataError(f"{e}; remove it or pass --overwrite") from None
    diff = sorted(k for k in set(spec) | set(old) if k not in ("complete", "skipped", "files") and old.get(k) != spec.get(k))
    if diff:
        raise ConfigError(f"--out {out} holds another FKD export (differs in {', '.join(diff)}); "
                          f"use another --out, or --overwrite to rewrite it")
    return True, old if old.get("complete") else None


def export_fkd(store_path: str | os.PathLike, dataset, out: str | os.PathLike, *, k: int | None = None,
               fp16: bool = False, overwrite: bool = False, show_progress: bool = True,
               log: Callable[[str], None] = print) -> ExportResult:
    """Write the store at ``store_path`` as FKD soft labels under ``out`` (resumable, one file per image)."""
    from ..distill import check_made_from

    store = TargetStore.open(store_path)
    ds = image_folder_dataset(dataset)
    k = _export_k(store, k, fp16)
    check_made_from(store, ds, "store")
    labels = label_relpaths([rel for rel, _ in ds.samples], ds.split)
    spec = export_spec(store, ds, k, fp16)
    out = Path(out)
    resume, finished = _resume_export(out, spec, overwrite)
    if finished is not None:
        log(f"export {out} is already complete ({finished.get('files')} files)")
        return ExportResult(0, int(finished.get("files", 0)), k, spec["label_type"], True)
    out.mkdir(parents=True, exist_ok=True)
    if resume:  # leftovers of writes killed before their rename
        for f in (out / ds.split).rglob(f"*{LABEL_SUFFIX}.tmp.*"):
            f.unlink(missing_ok=True)
    write_json_atomic(out / EXPORT_MARKER, {**spec, "complete": False})
    skipped = sorted(store.skipped)
    todo = [i for i in range(len(ds)) if i not in store.skipped and not (resume and (out / labels[i]).exists())]
    with bar(len(todo), "export-fkd", "img", enabled=show_progress) as pbar:
        for i in todo:
            params, idx, val = _export_labels(store, i, k)
            if (params[:, _FLIP + 1:] != 0).any():  # not neutral: FKD cannot replay them
                raise ConfigError(f"store {store.path} has photometric views (image {i}: colour jitter, grayscale, "
                                  f"blur or solarize); FKD soft labels hold only a crop and a flip")
            save_label_file(out / labels[i], params, idx, val, fp16)
            pbar.update(1)
    n_files = len(ds) - len(skipped)
    write_json_atomic(out / EXPORT_MARKER, {**spec, "complete": True, "files": n_files,
                                            "skipped": [ds.samples[i][0] for i in skipped]})
    if skipped:
        log(f"warning: {len(skipped)} images were skipped when the store was written and have no label file "
            f"(first: {ds.samples[skipped[0]][0]}); FKD's trainer expects one file per image")
    return ExportResult(len(todo), n_files, k, spec["label_type"], False)
