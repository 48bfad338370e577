"""Indexed datasets: every item is ``(image, label, index)``, built from a ``--data`` spec string.

The spec forms and fingerprints are described in the README; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..errors import DataError
from .image_io import IMAGE_EXTENSIONS, load_rgb
from .groceries import GroceriesConfig, ensure_groceries
from .mnist5k import Mnist5kConfig, ensure_mnist5k
from .synthetic import SyntheticConfig, ensure_synthetic

SPLITS = ("train", "val")
DEFAULT_DATA_ROOT = os.environ.get("FKD_SSL_DATA_ROOT", "~/.cache/fkd_ssl")
_RACY_S = 2.0  # a file modified this recently is hashed again next time (its mtime may not show a rewrite yet)


def file_digests(root: Path, rels: list[str], stats: list[os.stat_result], cache_dir: Path) -> list[str]:
    """sha256 (32 hex) of each file ``root/rel``'s bytes, cached by (path, size, mtime_ns) in
    ``cache_dir/file-hashes/<sha of root>.json``: a second call costs the stats it is given."""
    from ..fileio import file_sha256, write_json_atomic
    from ..progress import bar

    cache = cache_dir.expanduser() / "file-hashes" / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.json"
    try:
        old = json.loads(cache.read_text())
    except (OSError, ValueError):
        old = {}
    key = [[st.st_size, st.st_mtime_ns] for st in stats]
    todo = [k for k, rel in enumerate(rels) if old.get(rel, [None, None])[:2] != key[k]]
    new = {rel: old[rel] for k, rel in enumerate(rels) if rel in old and old[rel][:2] == key[k]}
    with bar(len(todo), f"hashing {root}", "file", enabled=len(todo) > 2000) as pbar:
        for k in todo:
            new[rels[k]] = key[k] + [file_sha256(root / rels[k])[:32]]
            pbar.update()
    if todo:
        now = time.time_ns()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache, {r: v for r, v in new.items() if now - v[1] > _RACY_S * 1e9})
        except OSError:
            pass  # an unwritable cache only costs hashing again
    return [new[rel][2] for rel in rels]


class IndexedDataset:
    """Base class: ``ds[i] -> (transform(image), label, i)``; subclasses implement :meth:`load` and :meth:`_identity`."""

    classes: list[str]
    targets: list[int]
    name: str
    split: str
    transform: Callable | None = None  # set by build_dataset

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self, index: int) -> Image.Image:
        """The decoded RGB image ``index`` (no transform)."""
        raise NotImplementedError

    def source(self, index: int) -> str:
        """Where image ``index`` comes from (a path, or ``name[split][index]``)."""
        return f"{self.name}[{self.split}][{index}]"

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index], index

    def _identity(self) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A stable hex digest identifying this split's exact content and order."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = hashlib.sha256((self._identity() + "\n".join(self.classes)).encode()).hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "num_images": len(self),
                "num_classes": self.num_classes, "fingerprint": self.fingerprint()}


class ImageFolderDataset(IndexedDataset):
    """``root/<class>/<image>`` in sorted order (ImageNet layout); non-image files are ignored and counted."""

    def __init__(self, root: str | os.PathLike, split: str, name: str = "imagefolder",
                 cache_dir: str | os.PathLike = DEFAULT_DATA_ROOT):
        self.root, self.cache_dir = Path(root), Path(cache_dir)
        self.name, self.split = name, split
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist (expected {self.root}/<class>/<image files>)")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"dataset folder {self.root} has no class folders (expected {self.root}/<class>/<image files>)")
        self.samples: list[tuple[str, int]] = []
        self.stats: list[os.stat_result] = []
        self.ignored_files = 0
        for label, c in enumerate(self.classes):
            n_before = len(self.samples)
            for dirpath, dirnames, filenames in os.walk(self.root / c, followlinks=True):
                dirnames.sort()
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        full = os.path.join(dirpath, fn)
                        self.samples.append((os.path.relpath(full, self.root), label))
                        self.stats.append(os.stat(full))
                    else:
                        self.ignored_files += 1
            if len(self.samples) == n_before:
                raise DataError(f"class folder {self.root / c} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.targets = [label for _, label in self.samples]

    def path(self, index: int) -> Path:
        return self.root / self.samples[index][0]

    def source(self, index: int) -> str:
        return str(self.path(index))

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.path(index))

    def _identity(self) -> str:
        rels = [rel for rel, _ in self.samples]
        digests = file_digests(self.root, rels, self.stats, self.cache_dir)
        return "imagefolder-content\n" + "\n".join(f"{rel}\t{st.st_size}\t{d}" for rel, st, d in
                                                    zip(rels, self.stats, digests))


class ArrayDataset(IndexedDataset):
    """Images held as a uint8 array (N, H, W, 3) with labels: CIFAR, STL-10."""

    def __init__(self, images: np.ndarray, targets, classes, name: str, split: str, identity: str):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.name, self.split, self._id = name, split, identity

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def _identity(self) -> str:
        return self._id


def _files_identity(folder: Path) -> str:
    """Sorted names and sizes of the files torchvision reads for a split."""
    if not folder.is_dir():
        return ""
    entries = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
    return "\n".join(f"{n}\t{s}" for n, s in entries)


def _torchvision_dataset(kind: str, root: Path, split: str) -> ArrayDataset:
    import torchvision.datasets as tvd

    folder, archive = {"cifar10": ("cifar-10-batches-py", "CIFAR-10 python version (cifar-10-python.tar.gz)"),
                       "cifar100": ("cifar-100-python", "CIFAR-100 python version (cifar-100-python.tar.gz)"),
                       "stl10": ("stl10_binary", "STL-10 binary version (stl10_binary.tar.gz)")}[kind]
    expected, hint = root / folder, f"the {archive} extracted"
    if not expected.is_dir():
        raise DataError(f"{kind} files not found: expected {expected}/ ({hint} into {root}); nothing is downloaded")
    try:
        if kind == "stl10":
            ds = tvd.STL10(str(root), split="train" if split == "train" else "test", download=False)
            images = np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1))
            targets, classes = ds.labels, ds.classes
        else:
            # torchvision checks the md5 of every batch file against the official release before
            # it unpickles it, so only the official files are ever deserialised.
            cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
            ds = cls(str(root), train=split == "train", download=False)
            images, targets, classes = ds.data, ds.targets, ds.classes
    except RuntimeError as e:
        raise DataError(f"{kind} files under {expected} are missing or corrupt ({e}); put {hint} into {root}") from e
    identity = f"{kind}:{split}:{len(targets)}\n" + _files_identity(expected)
    return ArrayDataset(images, targets, classes, kind, split, identity)


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value."""

    kind: str
    path: str | None = None
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if self.kind in BUILT_IN:
            opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            return self.kind + (f":{opts}" if opts else "")
        return f"{self.kind}:{self.path}"


#: the sets made once into ``--data-root``: kind -> (options, make)
BUILT_IN = {"synthetic": (SyntheticConfig, ensure_synthetic), "mnist5k": (Mnist5kConfig, ensure_mnist5k),
            "groceries": (GroceriesConfig, ensure_groceries)}
KINDS = (*BUILT_IN, "imagefolder", "cifar10", "cifar100", "stl10")


def parse_spec(spec: str) -> DataSpec:
    """Parse a ``--data`` value (see the module docstring); raises DataError if malformed."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise DataError(f"--data {spec!r}: unknown dataset kind {kind!r} (one of {', '.join(KINDS)})")
    if kind in BUILT_IN:
        options, fields = {}, BUILT_IN[kind][0].__dataclass_fields__
        for item in filter(None, rest.split(",")):
            k, eq, v = item.partition("=")
            if not eq or k not in fields:
                raise DataError(f"--data {spec!r}: bad {kind} option {item!r} (options: {', '.join(fields)})")
            try:
                options[k] = int(v)
            except ValueError as e:
                raise DataError(f"--data {spec!r}: {kind} option {k} must be an integer, got {v!r}") from e
        return DataSpec(kind, None, options)
    if not rest:
        raise DataError(f"--data {spec!r}: {kind} needs a path, as in {kind}:/path/to/data")
    return DataSpec(kind, rest)


def build_dataset(spec: str | DataSpec, split: str = "train", root: str | os.PathLike | None = None,
                  transform: Callable | None = None, verbose: bool = True) -> IndexedDataset:
    """Build the ``split`` ("train" or "val") of the dataset named by ``spec`` (``root``: the data cache)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if s.kind in BUILT_IN:
        config, make = BUILT_IN[s.kind]
        folder = make(Path(root or DEFAULT_DATA_ROOT), config(**s.options), verbose=verbose)
        ds: IndexedDataset = ImageFolderDataset(folder / split, split, name=str(s), cache_dir=root or DEFAULT_DATA_ROOT)
    elif s.kind == "imagefolder":
        base = Path(s.path).expanduser()
        if not base.is_dir():
            raise DataError(f"--data {s}: folder {base} does not exist (expected {base}/train/<class>/... and {base}/val/<class>/...)")
        if not (base / split).is_dir():
            raise DataError(f"--data {s}: split folder {base / split} is missing (expected {base}/{split}/<class>/<images>)")
        ds = ImageFolderDataset(base / split, split, name=str(s), cache_dir=root or DEFAULT_DATA_ROOT)
    else:
        ds = _torchvision_dataset(s.kind, Path(s.path).expanduser(), split)
        ds.name = str(s)
    if len(ds) == 0:
        raise DataError(f"--data {s}: split {split} is empty")
    ds.transform = transform
    return ds
