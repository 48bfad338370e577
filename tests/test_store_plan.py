"""``--plan`` (fkd_ssl/store/plan.py): gen_targets.py and gen_label_map.py print size, free space and time,
write nothing, and a run that cannot fit on the disk is refused before it starts."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from conftest import TINY
from fkd_ssl.checkpoint import save_model
from fkd_ssl.commands import gen_label_map, gen_targets
from fkd_ssl.errors import ConfigError
from fkd_ssl.models import Encoder, ModelSpec
from fkd_ssl.store import TargetStore
from fkd_ssl.store import plan as P


def _ckpt(tmp_path, **spec) -> str:
    torch.manual_seed(0)
    model = Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=32, **spec))
    return str(save_model(tmp_path / "teacher" / "model", model.eval(), {"method": "test"}))


def _args(data_root, teacher, out, *extra):
    return ["--data", TINY, "--data-root", str(data_root), "--teacher", teacher, "--out", str(out), "--workers", "0",
            "--device", "cpu", "--shard-size", "16", *extra]


def test_gen_targets_plan_writes_nothing_and_matches_the_store(tmp_path, data_root, capsys):
    teacher, out = _ckpt(tmp_path, head="moco", head_hidden=32, head_out=16), tmp_path / "store"
    assert gen_targets.main(_args(data_root, teacher, out, "--views-per-image", "4", "--plan")) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    for what in ("bytes per view (all files)", "store size", "free space", "fits", "generation time"):
        assert what in text, text
    planned = int(text.split("store size: ")[1].split("(")[1].split(" bytes")[0].replace(",", ""))
    assert gen_targets.main(_args(data_root, teacher, out, "--views-per-image", "4")) == 0
    actual = sum(f.stat().st_size for f in out.iterdir())
    assert actual <= planned < actual + 16_000  # exact record files; JSON allowed for, not guessed low
    assert TargetStore.open(out).num_images == 40


def test_a_store_that_cannot_fit_is_refused_before_it_starts(tmp_path, data_root, monkeypatch):
    teacher, out = _ckpt(tmp_path, head="moco", head_hidden=32, head_out=16), tmp_path / "store"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 5000, 5000))
    with pytest.raises(ConfigError, match=r"--out .*store needs .* GB more .*0\.000 GB are free"):
        gen_targets.main(_args(data_root, teacher, out, "--views-per-image", "4"))
    assert not any(out.iterdir())


def test_gen_label_map_plan(tmp_path, data_root, capsys):
    teacher, out = _ckpt(tmp_path, num_classes=10), tmp_path / "maps"
    assert gen_label_map.main(_args(data_root, teacher, out, "--topk", "3", "--plan")) == 0
    text = capsys.readouterr().out
    assert not out.exists() and "40 images x 1 views" in text and "generation time" in text
    plan = P.StorePlan(out, 10, 4, 10**10, 9 * 10**9, 2 * 10**9, None, 0)  # a resumed store needs only the rest
    assert plan.fits and plan.needed_bytes == 10**9 and not P.StorePlan(out, 10, 4, 10**10, 0, 2 * 10**9, None, 0).fits
