"""Content-aware dataset fingerprints (fkd_ssl/data/datasets.py): an image rewritten with the same size
is another dataset for a store and for the feature cache; a rerun hashes nothing it has seen."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from fkd_ssl.checkpoint import save_model
from fkd_ssl.commands import gen_targets
from fkd_ssl.data import build_dataset
from fkd_ssl import fileio
from fkd_ssl.errors import ConfigError
from fkd_ssl.evaluation.features import extract_features, resolve_source
from fkd_ssl.models import Encoder, ModelSpec
from test_evaluation import CPU

OLD = 1_600_000_000 * 10**9  # an mtime well outside the racy window


@pytest.fixture()
def data(tmp_path, data_root):
    """A private copy of the tiny synthetic set stored as uncompressed PNG (a pixel rewritten keeps the file size)
    with old mtimes, and its --data flags."""
    src = build_dataset(TINY, "train", data_root, verbose=False).root.parent
    shutil.copytree(src, tmp_path / "imgs")
    for p in (tmp_path / "imgs").rglob("*.jpg"):
        Image.open(p).save(p, format="PNG", compress_level=0)
        os.utime(p, ns=(OLD, OLD))
    return tmp_path / "imgs", ["--data", f"imagefolder:{tmp_path / 'imgs'}", "--data-root", str(tmp_path / "cache")]


def _rewrite_same_size(path, mtime_ns: int | None = None) -> None:
    size = path.stat().st_size
    arr = np.asarray(Image.open(path)).copy()
    arr[0, 0] ^= 0xFF
    Image.fromarray(arr).save(path, format="PNG", compress_level=0)
    assert path.stat().st_size == size
    if mtime_ns:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_fingerprint_sees_content_and_a_rerun_only_stats(data, monkeypatch):
    root, flags = data
    first = build_dataset(flags[1], "train", flags[-1]).fingerprint()
    calls, real = [], fileio.file_sha256
    monkeypatch.setattr(fileio, "file_sha256", lambda p: calls.append(p) or real(p))
    ds = build_dataset(flags[1], "train", flags[-1])
    assert ds.fingerprint() == first and calls == []  # a stat per file, nothing hashed
    target = root / "train" / ds.samples[3][0]
    _rewrite_same_size(target, OLD + 10**9)
    assert build_dataset(flags[1], "train", flags[-1]).fingerprint() != first and calls == [target]


def _teacher(tmp_path) -> str:
    torch.manual_seed(0)
    model = Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=32, head="moco", head_hidden=32, head_out=16))
    return str(save_model(tmp_path / "teacher" / "model", model.eval(), {"method": "test"}))


def test_store_and_feature_cache_of_rewritten_images_are_not_reused(data, tmp_path):
    root, flags = data
    argv = [*flags, "--teacher", _teacher(tmp_path), "--out", str(tmp_path / "store"), "--views-per-image", "2",
            "--workers", "0", "--device", "cpu"]
    assert gen_targets.main(argv) == 0
    ds = build_dataset(flags[1], "train", flags[-1])
    kw = dict(batch_size=8, workers=0, cache_dir=tmp_path / "features", progress=False)
    assert not extract_features(resolve_source("pixels:8"), ds, CPU, **kw).cached
    assert extract_features(resolve_source("pixels:8"), ds, CPU, **kw).cached
    _rewrite_same_size(root / "train" / ds.samples[0][0])
    with pytest.raises(ConfigError, match=r"identity\.dataset\.fingerprint"):
        gen_targets.main(argv)
    fresh = extract_features(resolve_source("pixels:8"), build_dataset(flags[1], "train", flags[-1]), CPU, **kw)
    assert not fresh.cached
