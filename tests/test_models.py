"""Models and checkpoints: round trips, plain state dicts, named ImageNet teachers, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from fkd_ssl.checkpoint import load_model, load_state, save_model, save_state
from fkd_ssl.errors import CheckpointError, ConfigError
from fkd_ssl.models import Encoder, ModelSpec, create_backbone, load_named_teacher, named_teacher_file


def _tiny(**kw) -> Encoder:
    torch.manual_seed(0)
    return Encoder(ModelSpec(arch="resnet10t", input_size=32, head_hidden=64, head_out=16, **kw)).eval()


@pytest.mark.parametrize("kw", [dict(head="moco", stem="small"), dict(head="simsiam", predictor_hidden=32),
                                dict(num_classes=7, stem="cifar")])
def test_checkpoint_round_trip_same_outputs(tmp_path, kw):
    model = _tiny(**kw)
    x = torch.randn(3, 3, 32, 32)
    path = save_model(tmp_path / "m", model, {"method": "test", "epochs": 3})
    assert path.name == "m.safetensors" and (tmp_path / "m.json").is_file()
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["model"]["arch"] == "resnet10t" and side["epochs"] == 3
    loaded, meta = load_model(tmp_path / "m.json")
    assert meta["method"] == "test"
    with torch.no_grad():
        assert torch.equal(model.features(x), loaded.features(x))
        if model.projector is not None:
            assert torch.equal(model.project(x), loaded.project(x))
        if kw.get("num_classes"):
            assert torch.equal(model.logits(x), loaded.logits(x))


def test_small_stems_reduce_downsampling():
    x = torch.randn(1, 3, 32, 32)
    maps = {s: create_backbone("resnet18", stem=s).eval().forward_features(x).shape[-1] for s in ("default", "small", "cifar")}
    assert maps == {"default": 1, "small": 2, "cifar": 4}


def test_plain_timm_and_torchvision_state_dicts(tmp_path):
    src = timm.create_model("resnet10t", num_classes=5).eval()
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    model, meta = load_model(tmp_path / "plain.pth", arch="resnet10t")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.logits(x), src(x), atol=1e-6)
    assert model.spec.num_classes == 5 and meta["method"] == "pretrained"
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="does not fit --arch resnet18"):
        load_model(tmp_path / "plain.pth", arch="resnet18")

    import torchvision

    tv = torchvision.models.resnet18(num_classes=4).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model, _ = load_model(tmp_path / "tv.pth", arch="tv:resnet18")
    with torch.no_grad():
        assert torch.allclose(model.logits(x), tv(x), atol=1e-6)
        assert model.features(x).shape == (2, 512)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    model = _tiny(head="moco")
    path = save_model(tmp_path / "m", model)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors is truncated"):
        load_model(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world" * 10)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_model(tmp_path / "junk.safetensors")
    save_state(tmp_path / "state.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="training state, not a model"):
        load_model(tmp_path / "state.safetensors")
    with pytest.raises(CheckpointError, match="no classifier"):
        load_model(path, expect="classifier")
    with pytest.raises(ConfigError, match="unknown timm model"):
        Encoder(ModelSpec(arch="resnet_does_not_exist"))


def test_training_state_round_trip(tmp_path):
    model = _tiny(head="moco")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model.project(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "arr": np.arange(5), "n": 3,
             "t": (1, "a", [2.5, None])}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["n"] == 3 and back["t"] == (1, "a", [2.5, None]) and np.array_equal(back["arr"], np.arange(5))
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["opt"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_named_teacher_mapping_is_exact():
    teacher = load_named_teacher("effnet-lite0")
    source = torch.load(named_teacher_file("effnet-lite0"), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in teacher.backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst) == 247
    for (ks, vs), (kd, vd) in zip(src, dst):
        assert torch.equal(vs, vd), (ks, kd)
    assert teacher.spec.mean == (0.5, 0.5, 0.5) and teacher.spec.num_classes == 1000


def test_named_teacher_classifies_sample_photos():
    """The EfficientNet-Lite0 ImageNet teacher recognises scikit-learn's two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from torchvision.transforms import v2

    teacher, meta = load_model("effnet-lite0")
    assert meta["method"] == "pretrained"
    tf = v2.Compose([v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224),
                     v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    x = torch.stack([tf(Image.fromarray(load_sample_image(n))) for n in ("china.jpg", "flower.jpg")])
    with torch.no_grad():
        pred = teacher.logits(x).argmax(1).tolist()
    assert pred == [698, 985]  # ImageNet 'palace', 'daisy'
