"""Datasets: synthetic determinism, fingerprints, specs, ImageFolder edge cases, image decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from fkd_ssl.data import SYNTHETIC_CLASSES, build_dataset, load_rgb, load_uint8, parse_spec
from fkd_ssl.data.synthetic import SyntheticConfig, ensure_synthetic
from fkd_ssl.errors import DataError


def test_synthetic_is_deterministic_and_balanced(tmp_path, data_root):
    a = build_dataset(TINY, "train", data_root)
    b = build_dataset(TINY, "train", tmp_path)  # generated again elsewhere
    assert len(a) == 40 and a.num_classes == len(SYNTHETIC_CLASSES) == 10
    assert a.fingerprint() == b.fingerprint()
    assert np.array_equal(np.asarray(a.load(7)), np.asarray(b.load(7)))
    assert np.bincount(a.targets).tolist() == [4] * 10
    img, label, idx = a[3]
    assert img.size == (32, 32) and img.mode == "RGB" and label == a.targets[3] and idx == 3


def test_synthetic_seed_changes_content(tmp_path):
    a = ensure_synthetic(tmp_path, SyntheticConfig(train=10, val=10, size=32, seed=0), verbose=False)
    b = ensure_synthetic(tmp_path, SyntheticConfig(train=10, val=10, size=32, seed=1), verbose=False)
    pa = np.asarray(Image.open(next((a / "train" / SYNTHETIC_CLASSES[0]).iterdir())))
    pb = np.asarray(Image.open(next((b / "train" / SYNTHETIC_CLASSES[0]).iterdir())))
    assert not np.array_equal(pa, pb)


def test_fingerprint_tracks_content(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / split / c / f"{i}.png")
    spec = f"imagefolder:{root}"
    fp = build_dataset(spec, "train").fingerprint()
    assert build_dataset(spec, "train").fingerprint() == fp
    assert build_dataset(spec, "val").fingerprint() == fp  # same relative paths and sizes
    Image.new("RGB", (9, 9)).save(root / "train" / "a" / "2.png")
    assert build_dataset(spec, "train").fingerprint() != fp


def test_spec_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset kind"):
        parse_spec("mnist:/x")
    with pytest.raises(DataError, match="needs a path"):
        parse_spec("imagefolder")
    with pytest.raises(DataError, match="bad synthetic option"):
        parse_spec("synthetic:colour=3")
    with pytest.raises(DataError, match="must be an integer"):
        parse_spec("synthetic:train=x")
    with pytest.raises(DataError, match=r"does not exist"):
        build_dataset(f"imagefolder:{tmp_path / 'nope'}", "train")
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="split folder .*val"):
        build_dataset(f"imagefolder:{tmp_path / 'd'}", "val")
    with pytest.raises(DataError, match="no class folders"):
        build_dataset(f"imagefolder:{tmp_path / 'd'}", "train")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_dataset(f"cifar10:{tmp_path}", "train")
    with pytest.raises(DataError, match="stl10_binary"):
        build_dataset(f"stl10:{tmp_path}", "val")


def test_imagefolder_skips_non_images_and_rejects_empty_class(tmp_path):
    root = tmp_path / "ds" / "train"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / "x.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*dog has no images"):
        build_dataset(f"imagefolder:{tmp_path / 'ds'}", "train")
    Image.new("RGB", (8, 8)).save(root / "dog" / "y.png")
    ds = build_dataset(f"imagefolder:{tmp_path / 'ds'}", "train")
    assert len(ds) == 2 and ds.ignored_files == 2 and ds.classes == ["cat", "dog"]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "I;16", "LA"])
def test_load_rgb_converts_modes(tmp_path, mode):
    arr = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)
        path = tmp_path / "x.png"
    else:
        img = Image.fromarray(arr, mode="L").convert(mode)
        path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (16, 16)
    if mode == "I;16":  # rescaled, not clipped to white
        got = np.asarray(out)[..., 0]
        assert got.max() == 255 and got.min() == 0 and np.abs(got.astype(int) - arr).max() <= 1


def test_load_rgb_names_corrupt_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_rgb(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        load_rgb(empty)


def test_load_uint8_returns_image_or_one_line_reason(tmp_path):
    root = tmp_path / "ds" / "train" / "cat"
    root.mkdir(parents=True)
    arr = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(arr).save(root / "a.png")
    (root / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = build_dataset(f"imagefolder:{tmp_path / 'ds'}", "train")
    img, err = load_uint8(ds, 0)
    assert err is None and img.dtype == torch.uint8 and img.shape == (3, 6, 10)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), arr)
    img, err = load_uint8(ds, 1)
    assert img is None and "b.jpg" in err and "\n" not in err


def test_data_root_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "root").write_text("not a folder")
    with pytest.raises(DataError, match="--data-root .*root is a file"):
        build_dataset(TINY, "train", tmp_path / "root")
    assert (tmp_path / "root").read_text() == "not a folder"
