"""``python -m fkd_ssl.store verify --replay N``: the teacher re-run on replayed views agrees with a fresh
store and not with one whose images were edited after generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fkd_ssl.checkpoint import save_model
from fkd_ssl.commands import gen_targets
from fkd_ssl.commands import store as store_cmd
from fkd_ssl.errors import DataError
from fkd_ssl.models import Encoder, ModelSpec


def _images(root, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    for k in range(n):
        (root / "train" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:40, 0:48]
        arr = np.stack([yy * 6, xx * 5, (yy * xx) % 255], -1) + rng.integers(0, 60, (40, 48, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / "train" / f"c{k % 2}" / f"{k}.png")


@pytest.fixture()
def made(tmp_path):
    torch.manual_seed(0)
    model = Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=32, head="moco", head_hidden=32, head_out=16))
    with torch.no_grad():  # BN statistics that make outputs depend on the input
        model.train()
        model.project(torch.randn(32, 3, 32, 32))
    teacher = str(save_model(tmp_path / "teacher" / "model", model.eval(), {"method": "test"}))
    _images(tmp_path / "imgs")
    data = ["--data", f"imagefolder:{tmp_path / 'imgs'}", "--device", "cpu"]
    assert gen_targets.main([*data, "--teacher", teacher, "--out", str(tmp_path / "store"), "--views-per-image", "4",
                             "--workers", "0", "--codec", "fp16"]) == 0
    return tmp_path, ["verify", str(tmp_path / "store"), "--replay", "100", "--teacher", teacher, *data]


def test_replay_agrees_on_a_fresh_store(made, capsys):
    _, argv = made
    assert store_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert "replay: 32 views of 8 images" in out and "0 views disagree" in out


def test_replay_fails_when_an_image_was_edited(made, capsys):
    root, argv = made
    f = root / "imgs" / "train" / "c1" / "3.png"
    edited = 255 - np.asarray(Image.open(f))  # same size, other content
    Image.fromarray(edited).save(f)
    with pytest.raises(DataError, match=r"of 32 replayed views disagree with the teacher"):
        store_cmd.main(argv)
    assert "disagree" in capsys.readouterr().out
