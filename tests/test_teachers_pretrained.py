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


def gen(capsys, data_root, out, *extra, views=("--views-per-image", "2", "--view-size", "32")) -> str:
    """A tiny store (2 views of each image at 32 px); the command's stdout."""
    code, stdout, err = command(capsys, "gen_targets", "--data", TINY, "--data-root", data_root, "--out", out, *views,
                                "--batch-size", "16", "--workers", "0", "--device", "cpu", "--shard-size", "16",
                                "--codec", "fp32", *extra)
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


def _replayed(data_root, store_path, n=6):
    """The store's views 0..n-1 (slot 1) as the teacher saw them, and their stored targets."""
    store = TargetStore.open(store_path)
    cfg = ViewConfig.from_dict(store.identity.views)
    ds = build_dataset(TINY, "train", data_root)
    views = torch.stack([render_view(pil_to_uint8_tensor(ds.load(i)), store.params(i, 1), cfg) for i in range(n)])
    return store, views, store.targets(np.arange(n), np.ones(n, dtype=int))


def _student(capsys, data_root, store, out):
    code, _, err = command(capsys, "distill_ssl", "--data", TINY, "--data-root", data_root, "--store", store, "--out", out,
                           "--arch", "resnet10t", "--stem", "small", "--input-size", "24", "--crops-per-image", "2",
                           "--batch-size", "16", "--workers", "0", "--device", "cpu", "--head-hidden", "32",
                           "--queue-size", "16", "--epochs", "2")
    assert code == 0, err[-3000:]
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("pool", ["cls", "mean", "cls+mean"])
def test_vit_teacher_pooled_features_train_a_student(capsys, tmp_path, data_root, weights, pool):
    file = weights / "vit.safetensors"
    out = gen(capsys, data_root, tmp_path / "s", "--teacher", "timm:vit_tiny_patch16_224", "--teacher-weights", file,
              "--pool", pool, "--view-size", "40")  # --pool implies --target feature
    assert "view size 40 rounded to 32, a multiple of the teacher's patch size 16" in out
    store, views, stored = _replayed(data_root, tmp_path / "s")
    assert store.identity.views["size"] == 32 and store.identity.teacher["pool"] == pool
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, dynamic_img_size=True,
                            pretrained_cfg_overlay=dict(file=str(file))).eval()
    with torch.no_grad():
        tokens = vit.forward_features(normalize(views, vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"]))
    unit = torch.nn.functional.normalize
    parts = {"cls": unit(tokens[:, 0], dim=1), "mean": unit(tokens[:, 1:].mean(1), dim=1)}
    ref = unit(torch.cat([parts[p] for p in pool.split("+")], 1), dim=1).numpy()
    np.testing.assert_allclose(stored, ref, atol=1e-5)
    _student(capsys, data_root, tmp_path / "s", tmp_path / "student")


def test_ssl_library_checkpoint_backbone_and_head(capsys, tmp_path, data_root):
    """A lightly-style ViT checkpoint: backbone + MoCo v3-style head + momentum copies; --target proj
    uses the head, the loader says what it used and ignored."""
    from lightly.models.modules.heads import MoCoProjectionHead

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True).eval()
    head = MoCoProjectionHead(192, 64, 16, num_layers=3, batch_norm=True).eval()
    parts = {"backbone": vit, "projection_head": head, "backbone_momentum": vit}
    torch.save({"state_dict": {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}},
               tmp_path / "lightly.ckpt")
    n_vit, n_head = len(vit.state_dict()), len(head.state_dict())
    out = gen(capsys, data_root, tmp_path / "s", "--teacher", tmp_path / "lightly.ckpt", "--arch", "vit_tiny_patch16_224",
              "--target", "proj")
    assert (f"used {n_vit} tensors under 'backbone.' and {n_head} under 'projection_head.' (projection head); "
            f"ignored {n_vit} (backbone_momentum.* x{n_vit})") in out
    store, views, stored = _replayed(data_root, tmp_path / "s")
    teacher = store.identity.teacher
    with torch.no_grad():
        ref = torch.nn.functional.normalize(head(vit(normalize(views, teacher["mean"], teacher["std"]))), dim=1)
    np.testing.assert_allclose(stored, ref.numpy(), atol=1e-5)


def test_solo_learn_style_checkpoint_by_module_order(tmp_path):
    """A torchvision backbone saved as a Sequential of its children under ``backbone.``, a projector
    beside it and other tensors: the backbone loads by tensor order, the rest is reported."""
    from fkd_ssl.checkpoint import load_model

    net = torchvision.models.resnet18().eval()
    seq = torch.nn.Sequential(*list(net.children())[:-1])
    sd = {f"backbone.{k}": v for k, v in seq.state_dict().items()}
    sd.update({"projector.0.weight": torch.randn(32, 512), "projector.0.bias": torch.randn(32),
               "projector.2.weight": torch.randn(8, 32), "projector.2.bias": torch.randn(8),
               "classifier.weight": torch.randn(10, 512), "classifier.bias": torch.randn(10)})
    torch.save(sd, tmp_path / "solo.pth")
    model, meta = load_model(tmp_path / "solo.pth", arch="tv:resnet18")
    assert meta["loaded"].endswith("ignored 2 (classifier.* x2)") and model.spec.head_out == 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.features(x), seq(x).flatten(1), atol=1e-5)
    with pytest.raises(Exception, match="--teacher-prefix nothing.: no tensor"):
        load_model(tmp_path / "solo.pth", arch="tv:resnet18", prefix="nothing.")


def test_dino_style_checkpoint_projects_to_the_bottleneck(tmp_path, capsys):
    """DINO's teacher: ``backbone.`` + ``head.mlp`` (GELU MLP) + ``head.last_layer`` (weight-normed
    prototypes): --target proj is the normalised bottleneck; the prototype layer is reported ignored."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True).eval()
    mlp = torch.nn.Sequential(torch.nn.Linear(192, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                              torch.nn.Linear(64, 16))
    last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 100, bias=False))
    sd = {**{f"backbone.{k}": v for k, v in vit.state_dict().items()},
          **{f"head.mlp.{k}": v for k, v in mlp.state_dict().items()},
          **{f"head.last_layer.{k}": v for k, v in last.state_dict().items()}}
    save_file(sd, str(tmp_path / "dino.safetensors"))
    teacher, ident = load_teacher(str(tmp_path / "dino.safetensors"), arch="vit_tiny_patch16_224", kind="proj")
    assert "and 6 under 'head.' (projection head); ignored 2 (head.* x2)" in capsys.readouterr().out
    views = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(mlp(vit(normalize(views, ident["mean"], ident["std"]))), dim=1)
    assert ident["dim"] == 16 and torch.allclose(teacher(views), ref, atol=1e-5)


def test_moco_v2_checkpoint_with_the_head_inside_the_encoder(tmp_path, capsys):
    """MoCo v2's own checkpoint layout: ``module.encoder_q.*`` with the projection MLP as its ``fc``,
    the key encoder and the queue beside it, wrapped with the epoch and optimizer state."""
    torch.manual_seed(0)
    enc = torchvision.models.resnet18()
    enc.fc = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    enc.eval()
    sd = {f"module.{p}.{k}": v for p in ("encoder_q", "encoder_k") for k, v in enc.state_dict().items()}
    sd.update({"module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, tmp_path / "moco_v2.pth.tar")
    teacher, ident = load_teacher(str(tmp_path / "moco_v2.pth.tar"), arch="tv:resnet18")
    n = len(enc.state_dict())
    assert (f"used {n - 4} tensors under 'encoder_q.' and 4 under 'encoder_q.fc.' (projection head); ignored {n + 2} "
            f"(encoder_k.* x{n}, queue.* x1, queue_ptr.* x1)") in capsys.readouterr().out
    views = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(enc(normalize(views, ident["mean"], ident["std"])), dim=1)
    assert ident["target"] == "proj" and torch.allclose(teacher(views), ref, atol=1e-5)


@pytest.mark.parametrize("extra, needle", [
    (["--teacher", "timm:resnet18", "--teacher-weights", "garbage"], "do not fit timm:resnet18"),
    (["--teacher", "timm:resnet18", "--teacher-weights", "vit"], "do not fit timm:resnet18"),
    (["--teacher", "timm:resnet18", "--teacher-weights", "r18", "--teacher-weights", "r18"],
     "--teacher-weights given 2 times for 1 timm:/tv: teachers"),
    (["--teacher", "timm:resnet18", "--teacher-weights", "r18", "--pool", "cls"],
     "--pool cls: the teacher resnet18.a1_in1k has no patch tokens"),
    (["--teacher", "timm:resnet18", "--teacher-weights", "r18", "--teacher", "timm:vit_tiny_patch16_224",
      "--teacher-weights", "vit", "--target", "feature"], "--ensemble mean: the teachers' targets have dims [192, 512]"),
])
def test_bad_teacher_flags_are_one_error_line(capsys, tmp_path, data_root, weights, extra, needle):
    (weights / "garbage").write_bytes(b"\x00" * 100)
    files = {"garbage": weights / "garbage", "r18": weights / "r18.safetensors", "vit": weights / "vit.safetensors"}
    code, _, err = command(capsys, "gen_targets", "--data", TINY, "--data-root", data_root, "--out", tmp_path / "s",
                           "--device", "cpu", *[files.get(a, a) for a in extra])
    assert code == 2 and "Traceback" not in err and needle in err.strip().splitlines()[-1], err
    assert not (tmp_path / "s").exists()
