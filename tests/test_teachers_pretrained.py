"""Pretrained teachers by name (timm:, tv:) read offline from a given file or the libraries' caches,
ViT teachers' pooled features, and SSL-library checkpoints under a prefix.  The weights are random
ones the tests write; nothing touches the network."""

from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from conftest import TINY
from fkd_ssl.cli import run_main
from fkd_ssl.data import build_dataset, pil_to_uint8_tensor
from fkd_ssl.store import TargetStore
from fkd_ssl.teacher import load_teacher
from fkd_ssl.views import ViewConfig, normalize, render_view

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.usefixtures("one_thread")


def command(capsys, module: str, *argv) -> tuple[object, str, str]:
    """``fkd-<module> argv...`` in this process: exit code, stdout, stderr."""
    import importlib

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(importlib.import_module(f"fkd_ssl.commands.{module}").main, [str(a) for a in argv])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def gen(capsys, data_root, out, *extra) -> str:
    """A tiny store (2 views of each image at 32 px); the command's stdout."""
    code, stdout, err = command(capsys, "gen_targets", "--data", TINY, "--data-root", data_root, "--out", out,
                                "--views-per-image", "2", "--view-size", "32", "--batch-size", "16", "--workers", "0",
                                "--device", "cpu", "--shard-size", "16", "--codec", "fp32", *extra)
    assert code == 0, err[-3000:]
    return stdout


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights of timm resnet18, torchvision resnet18 and a timm ViT-Tiny, as their files."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), str(d / "r18.safetensors"))
    torch.save(torchvision.models.resnet18().state_dict(), d / "tv_r18.pth")
    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), str(d / "vit.safetensors"))
    return d


def _stored_vs_library(data_root, store_path, library_model, n=6):
    """Stored targets next to the library model's own softmax on the same replayed views."""
    store = TargetStore.open(store_path)
    teacher = store.identity.teacher
    cfg = ViewConfig.from_dict(store.identity.views)
    ds = build_dataset(TINY, "train", data_root)
    views = torch.stack([render_view(pil_to_uint8_tensor(ds.load(i)), store.params(i, 1), cfg) for i in range(n)])
    with torch.no_grad():
        ref = torch.softmax(library_model.eval()(normalize(views, teacher["mean"], teacher["std"])), 1).numpy()
    return store.targets(np.arange(n), np.ones(n, dtype=int)), ref


@pytest.mark.parametrize("name", ["timm:resnet18", "tv:resnet18"])
def test_pretrained_name_with_weights_file(capsys, tmp_path, data_root, weights, name):
    file = weights / ("r18.safetensors" if name.startswith("timm") else "tv_r18.pth")
    gen(capsys, data_root, tmp_path / "s", "--teacher", name, "--teacher-weights", file)
    store = TargetStore.open(tmp_path / "s", verify=True)
    teacher, views = store.identity.teacher, store.identity.views
    if name.startswith("timm"):  # timm's pretrained config: the default tag's preprocessing
        cfg = timm.models.get_pretrained_cfg("resnet18")
        assert teacher["hash"].startswith("timm:resnet18.a1_in1k:") and views["interpolation"] == cfg.interpolation
        model = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    else:  # torchvision's weights enum: its transforms' preprocessing
        tf = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
        assert teacher["hash"].startswith("tv:resnet18:IMAGENET1K_V1:") and list(tf.mean) == teacher["mean"]
        model = torchvision.models.resnet18()
        model.load_state_dict(torch.load(file, weights_only=True))
    assert teacher["target"] == "probs" and teacher["dim"] == 1000 and teacher["input_size"] == 224
    stored, ref = _stored_vs_library(data_root, tmp_path / "s", model)
    np.testing.assert_allclose(stored, ref, rtol=1e-4, atol=1e-6)  # the file's weights, not a fresh init


def test_pretrained_names_read_the_library_caches(tmp_path, monkeypatch, weights):
    from huggingface_hub import constants

    snap = tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(weights / "r18.safetensors")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    (tmp_path / "torch" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "checkpoints" / "resnet18-f37072fd.pth").symlink_to(weights / "tv_r18.pth")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    for name, file in (("timm:resnet18", "r18.safetensors"), ("tv:resnet18", "tv_r18.pth")):
        _, cached = load_teacher(name)
        _, given = load_teacher(name, weights=str(weights / file))
        assert cached == given


@pytest.mark.parametrize("name, needle", [("timm:resnet18", "https://huggingface.co/timm/resnet18.a1_in1k"),
                                          ("tv:resnet18:IMAGENET1K_V1", "resnet18-f37072fd.pth at ")])
def test_missing_weights_is_one_error_line_naming_the_file(capsys, tmp_path, monkeypatch, data_root, name, needle):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    code, _, err = command(capsys, "gen_targets", "--data", TINY, "--data-root", data_root, "--teacher", name,
                           "--out", tmp_path / "s", "--device", "cpu")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and "--teacher-weights" in lines[0]
    assert not (tmp_path / "s").exists()
