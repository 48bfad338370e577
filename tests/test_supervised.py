"""Supervised FKD: soft cross-entropy and mixing against plain references, the classifier task in
each target mode, and the scripts (train_classifier -> gen_targets -> distill_sup) as a user runs them."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from conftest import ROOT, TINY, run_script
from fkd_ssl.checkpoint import load_model, save_model
from fkd_ssl.data import build_dataset
from fkd_ssl.dist import DistContext
from fkd_ssl.engine import OptimConfig, TrainConfig, train
from fkd_ssl.errors import ConfigError
from fkd_ssl.models import Encoder, ModelSpec
from fkd_ssl.losses import soft_ce_probs
from fkd_ssl.replay import FreshViews, ReplayBatch, ReplayDataset, StoreViews
from fkd_ssl.store import TargetStore
from fkd_ssl.supervised import (MixConfig, SoftLabelTask, build_classifier, classifier_accuracy, init_backbone,
                                mix_batch, one_hot)
from fkd_ssl.teacher import load_teacher
from fkd_ssl.views import ViewConfig, normalize

CPU = DistContext(0, 1, 0, torch.device("cpu"))
SMALL = ["--data", TINY, "--arch", "resnet10t", "--stem", "small", "--input-size", "32", "--workers", "0",
         "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _load_script(name: str):
    return importlib.import_module(f"fkd_ssl.commands.{name}")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, data_root) -> Path:
    """A classifier teacher trained by train_classifier.py for 2 epochs on the tiny set."""
    out = tmp_path_factory.mktemp("cls") / "run"
    code = _load_script("train_classifier").main([*SMALL, "--data-root", str(data_root), "--out", str(out),
                                                   "--epochs", "2", "--batch-size", "8", "--no-val"])
    assert code == 0
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def soft_store(tmp_path_factory, data_root, classifier) -> Path:
    out = tmp_path_factory.mktemp("softstore") / "s"
    proc = run_script("experiments/gen_targets.py", "--data", TINY, "--data-root", str(data_root), "--teacher",
                      str(classifier), "--views-per-image", "8", "--out", str(out), "--workers", "0",
                      "--device", "cpu", "--codec", "topk", "--topk", "3")
    assert proc.returncode == 0, proc.stderr
    return out


# ----------------------------------------------------------------------------- pure pieces


def test_soft_cross_entropy_matches_a_plain_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 3
    t = torch.softmax(torch.randn(7, 5, generator=g), 1)
    s = logits.double().numpy()
    logp = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    ref = float(-(t.double().numpy() * logp).sum(1).mean())
    assert math.isclose(float(soft_ce_probs(logits, t)), ref, rel_tol=1e-5)
    hard = torch.tensor([1, 4, 0])
    assert torch.allclose(soft_ce_probs(logits[:3], one_hot(hard, 5)),
                          torch.nn.functional.cross_entropy(logits[:3], hard))
    smooth = one_hot(hard, 5, 0.1)
    assert torch.allclose(smooth.sum(1), torch.ones(3)) and math.isclose(float(smooth[0, 1]), 0.92, rel_tol=1e-6)
    assert torch.allclose(soft_ce_probs(logits[:3], smooth),
                          torch.nn.functional.cross_entropy(logits[:3], hard, label_smoothing=0.1), atol=1e-6)


def test_mixup_and_cutmix_mix_images_and_labels_with_one_coefficient():
    x = torch.rand(6, 3, 16, 16)
    t = torch.softmax(torch.randn(6, 4), 1)
    assert mix_batch(x, t, MixConfig())[0] is x  # off by default
    torch.manual_seed(1)
    xm, tm, info = mix_batch(x, t, MixConfig(mixup_alpha=0.4))
    lam = info["lam"]
    assert info["mix"] == "mixup" and 0 < lam < 1
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0)) and torch.allclose(tm, lam * t + (1 - lam) * t.flip(0))
    torch.manual_seed(2)
    xc, tc, info = mix_batch(x, t, MixConfig(cutmix_alpha=1.0))
    pasted = (xc != x).any(1)  # (N, S, S): where the other image shows
    frac = float(pasted[0].float().mean())
    assert info["mix"] == "cutmix" and math.isclose(info["lam"], 1 - frac, abs_tol=1e-6)
    assert torch.equal(xc[pasted[None].expand(3, -1, -1, -1).transpose(0, 1)],
                       x.flip(0)[pasted[None].expand(3, -1, -1, -1).transpose(0, 1)])
    assert torch.allclose(tc, info["lam"] * t + (1 - info["lam"]) * t.flip(0))
    torch.manual_seed(3)  # resumable: the same global RNG state gives the same mix
    a = mix_batch(x, t, MixConfig(0.2, 1.0))
    torch.manual_seed(3)
    b = mix_batch(x, t, MixConfig(0.2, 1.0))
    assert torch.equal(a[0], b[0]) and a[2] == b[2]


def test_task_targets_per_mode(data_root, soft_store, classifier):
    store = TargetStore.open(soft_store)
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    teacher, _ = load_teacher(str(classifier), kind="probs")
    data = ReplayDataset(ds, StoreViews(store, 2, 0), ViewConfig.from_dict(store.identity.views), 32,
                         render_teacher=True)
    batch = default_collate([data[(i, 0)] for i in (0, 5, 9)])
    student = build_classifier("resnet10t", "small", 32, 10)
    labels = torch.as_tensor(ds.targets)
    hard = SoftLabelTask(student, "hard", labels).targets(batch)
    assert torch.equal(hard.argmax(1), labels[[0, 0, 5, 5, 9, 9]]) and torch.equal(hard.sum(1), torch.ones(6))
    stored = SoftLabelTask(student, "store", labels).targets(batch)
    online = SoftLabelTask(student, "online", labels, teacher).targets(batch)
    # the store's top-3 smoothed labels keep the teacher's top-3 classes and their probabilities
    top = online.topk(3, dim=1)
    assert torch.equal(stored.topk(3, dim=1).indices, top.indices)
    assert torch.allclose(stored.gather(1, top.indices), top.values, atol=2e-3)
    # the task's loss is the soft cross-entropy of the student's logits on the normalised views
    task = SoftLabelTask(student, "store", labels).eval()
    loss, metrics = task(batch)
    x = normalize(batch.views.flatten(0, 1), student.spec.mean, student.spec.std)
    assert torch.allclose(loss, soft_ce_probs(student.logits(x), stored), atol=1e-6)
    assert 0.0 <= metrics["target_agree"] <= 1.0


def test_task_refuses_wrong_setups(data_root):
    student = build_classifier("resnet10t", "small", 32, 10)
    with pytest.raises(ConfigError, match="--targets online needs a teacher"):
        SoftLabelTask(student, "online")
    with pytest.raises(ConfigError, match="needs a classifier"):
        SoftLabelTask(Encoder(ModelSpec(arch="resnet10t", input_size=32)), "store")
    with pytest.raises(ConfigError, match="label-smoothing"):
        SoftLabelTask(student, "hard", torch.zeros(3, dtype=torch.long), label_smoothing=1.0)
    batch = ReplayBatch(torch.zeros(2, 1, 3, 32, 32, dtype=torch.uint8), torch.ones(2, 1, 5) / 5, torch.tensor([0, 1]),
                        torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 0, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="the targets have 5 classes, the student 10"):
        SoftLabelTask(student, "store")(batch)


def test_init_backbone_copies_weights_and_refuses_another_arch(tmp_path):
    torch.manual_seed(0)
    src = Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=32, head="moco", head_hidden=16, head_out=8))
    ref = save_model(tmp_path / "ssl", src, {"method": "moco"})
    student = build_classifier("resnet10t", "small", 32, 10)
    info = init_backbone(student, str(ref))
    x = torch.rand(2, 3, 32, 32)
    src.eval(), student.eval()
    assert torch.allclose(student.features(x), src.features(x)) and info["method"] == "moco"
    with pytest.raises(ConfigError, match="is a resnet10t.*student is a resnet18"):
        init_backbone(build_classifier("resnet18", "small", 32, 10), str(ref))


def test_classifier_accuracy_counts_against_labels(data_root):
    val = build_dataset(TINY, "val", data_root, verbose=False)
    model = build_classifier("resnet10t", "small", 32, val.num_classes).eval()
    ranking = [3, 2, 4, 1, 5, 0, 6, 7, 8, 9]  # a classifier whose scores rank the classes so for every image
    bias = torch.zeros(10)
    bias[ranking] = torch.arange(10.0, 0.0, -1.0)
    with torch.no_grad():
        model.backbone.get_classifier().weight.zero_()
        model.backbone.get_classifier().bias.copy_(bias)
    acc = classifier_accuracy(model, val)

    def share(classes) -> float:
        return 100.0 * sum(1 for t in val.targets if t in classes) / len(val)

    assert 0 < share(ranking[:1]) < share(ranking[:5]) < 100  # the set can tell top-1, top-5 and 100% apart
    assert math.isclose(acc["val_top1"], share(ranking[:1]))
    assert math.isclose(acc["val_top5"], share(ranking[:5]))


# ----------------------------------------------------------------------------- the scripts


def _sup(data_root, out, *extra):
    return [*SMALL, "--data-root", str(data_root), "--out", str(out), "--batch-size", "8", *extra]


def test_fkd_online_and_hard_students(tmp_path, data_root, soft_store, classifier):
    script = _load_script("distill_sup")
    assert script.main(_sup(data_root, tmp_path / "fkd", "--store", str(soft_store), "--epochs", "4")) == 0
    meta = json.loads((tmp_path / "fkd" / "model.json").read_text())
    assert meta["method"] == "fkd_sup" and meta["view_epochs"] == 4 and meta["epochs"] == 1
    assert meta["crops_per_image"] == 4 and meta["store"]["codec"] == "topk" and meta["num_classes"] == 10
    rows = [json.loads(r) for r in (tmp_path / "fkd" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_top1" in r for r in rows) and rows[0]["views_per_s"] > 0
    model, _ = load_model(tmp_path / "fkd" / "model.safetensors")
    assert model.spec.num_classes == 10 and model.logits(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    assert script.main(_sup(data_root, tmp_path / "onl", "--targets", "online", "--teacher", str(classifier),
                            "--epochs", "4", "--no-val")) == 0
    assert json.loads((tmp_path / "onl" / "model.json").read_text())["method"] == "kd_online"
    assert script.main(_sup(data_root, tmp_path / "hard", "--targets", "hard", "--epochs", "2", "--mixup", "0.2",
                            "--cutmix", "1.0", "--no-val")) == 0
    meta = json.loads((tmp_path / "hard" / "model.json").read_text())
    assert meta["method"] == "plain" and meta["crops_per_image"] == 1 and meta["epochs"] == 2


@pytest.mark.parametrize("spread, stopped_at", [("0", 1), ("16", 16)])  # 16 = 4K, the default
def test_interrupted_student_resumes_to_the_uninterrupted_result(tmp_path, data_root, soft_store, spread, stopped_at):
    """A time-limited run stops after a step (with views spread over N steps: at the next multiple of N)."""
    script = _load_script("distill_sup")
    common = ("--store", str(soft_store), "--epochs", "4", "--mixup", "0.5", "--no-val", "--spread-steps", spread)
    assert script.main(_sup(data_root, tmp_path / "a", *common)) == 0
    assert script.main(_sup(data_root, tmp_path / "b", *common, "--max-minutes", "1e-9")) == 0
    assert json.loads((tmp_path / "b" / "model.json").read_text())["steps"] == stopped_at
    assert script.main(_sup(data_root, tmp_path / "b", *common)) == 0
    a, _ = load_model(tmp_path / "a" / "model.safetensors")
    b, _ = load_model(tmp_path / "b" / "model.safetensors")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("extra, message", [
    (["--targets", "store"], "--targets store needs --store"),
    (["--epochs", "6"], "--epochs 6 must be a multiple of --crops-per-image 4"),
    (["--batch-size", "6"], "--batch-size 6 .* must be a multiple of --crops-per-image 4"),
    (["--targets", "online"], "--targets online needs --teacher"),
    (["--targets", "relabel"], "--targets relabel needs --label-map"),
    (["--targets", "hard", "--teacher", "x"], "--teacher is for --targets online"),
    (["--targets", "store", "--label-smoothing", "0.1"], "--label-smoothing is for --targets hard"),
    (["--store", "s", "--spread-steps", "6"], "--spread-steps 6 must be a multiple of --crops-per-image 4"),
])
def test_script_flag_errors(tmp_path, data_root, extra, message):
    proc = run_script("experiments/distill_sup.py", *_sup(data_root, tmp_path / "x", *extra))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    import re
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "x").exists()


def test_script_refuses_an_embedding_store_and_a_wrong_init(tmp_path, data_root, soft_store):
    from fkd_ssl.store import StoreWriter, finalize, make_codec

    ds = build_dataset(TINY, "train", data_root, verbose=False)
    emb = tmp_path / "emb"
    identity = {"teacher": {"hash": "x", "target": "proj", "dim": 4}, "views": ViewConfig(size=32).to_dict(),
                "seed": 0, "group": 4, "dataset": {"fingerprint": ds.fingerprint(), "split": "train"}}
    from fkd_ssl.views import VIEW_PARAM_DIM

    w = StoreWriter.create_or_resume(emb, identity, num_images=len(ds), views_per_image=4, param_dim=VIEW_PARAM_DIM,
                                     target_dim=4, codec=make_codec("fp16"), shard_size=64)
    w.write(np.arange(len(ds)), np.zeros((len(ds), 4, VIEW_PARAM_DIM), np.float32), np.ones((len(ds), 4, 4), np.float32))
    w.complete_owned()
    w.close()
    finalize(emb)
    proc = run_script("experiments/distill_sup.py", *_sup(data_root, tmp_path / "x", "--store", str(emb)))
    assert proc.returncode == 2 and "holds proj targets, not class probabilities" in proc.stderr
    other = save_model(tmp_path / "r18", Encoder(ModelSpec(arch="resnet18", stem="small", input_size=32)), {})
    proc = run_script("experiments/distill_sup.py", *_sup(data_root, tmp_path / "y", "--store", str(soft_store),
                                                          "--init", str(other)))
    assert proc.returncode == 2 and "--init" in proc.stderr and "resnet18" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
