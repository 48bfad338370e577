"""The FKD student: view selection, replay fidelity, the distillation task, the script
(store and online-teacher modes, errors), exact resume and torchrun."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from conftest import ROOT, TINY
from fkd_ssl.checkpoint import load_model, save_model
from fkd_ssl.data import build_dataset, pil_to_uint8_tensor
from fkd_ssl.dist import DistContext
from fkd_ssl.distill import DistillTask, build_student, check_head_dim, store_views
from fkd_ssl.engine import OptimConfig, TrainConfig, train
from fkd_ssl.errors import ConfigError
from fkd_ssl.losses import LOSSES, DistillLoss
from fkd_ssl.models import Encoder, ModelSpec
from fkd_ssl.replay import (FRESH_SLOT_BASE, FreshViews, ReplayBatch, ReplayDataset, StoreViews, cycle_epochs,
                            decode_rgb, reuse_warning, select_slots)
from fkd_ssl.store import TargetStore
from fkd_ssl.teacher import load_teacher
from fkd_ssl.views import VIEW_PARAM_DIM, ViewConfig, normalize, render_view

CPU = DistContext(0, 1, 0, torch.device("cpu"))
R, K = 6, 2
SCRIPT = "experiments/distill_ssl.py"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, data_root) -> Path:
    """A random-init teacher whose targets differ between images: BN statistics from the images
    and the projection's mean moved into the last bias (else all targets point the same way)."""
    torch.manual_seed(0)
    model = Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=32, head="moco", head_hidden=32, head_out=16))
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    x = normalize(torch.stack([pil_to_uint8_tensor(ds.load(i)) for i in range(len(ds))]), model.spec.mean,
                  model.spec.std)
    with torch.no_grad():
        model.train()
        model.project(x)
        model.eval()
        last = [m for m in model.projector.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias -= model.project(x).mean(0)
    return save_model(tmp_path_factory.mktemp("teacher") / "model", model, {"method": "test"})


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, data_root, teacher_ckpt) -> Path:
    """A finished fp16 store of R views per image of the TINY set, made in-process."""
    from fkd_ssl.generate import generate
    from fkd_ssl.store import StoreWriter, finalize, make_codec

    out = tmp_path_factory.mktemp("store") / "s"
    teacher, tid = load_teacher(str(teacher_ckpt))
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    views = ViewConfig(size=32, scale=(0.2, 1.0))
    identity = {"teacher": tid, "views": views.to_dict(), "seed": 0, "group": 4,
                "dataset": {"fingerprint": ds.fingerprint(), "split": "train", "num_classes": ds.num_classes}}
    w = StoreWriter.create_or_resume(out, identity, num_images=len(ds), views_per_image=R, param_dim=VIEW_PARAM_DIM,
                                     target_dim=teacher.dim, codec=make_codec("fp16"), shard_size=16)
    generate(teacher, ds, w, views, 0, 64, 0, torch.device("cpu"), 4, show_progress=False)
    w.complete_owned()
    w.close()
    finalize(out)
    return out


def _script():
    return importlib.import_module("fkd_ssl.commands.distill_ssl")


def _args(data_root, store, out, *extra):
    return ["--data", TINY, "--data-root", str(data_root), *(["--store", str(store)] if store else []),
            "--out", str(out), "--arch", "resnet10t", "--stem", "small", "--input-size", "24", "--crops-per-image",
            str(K), "--batch-size", str(8 * K), "--workers", "0", "--device", "cpu", "--head-hidden", "32",
            "--queue-size", "16", "--epochs", str(K), *extra]  # samples (views): 8 images per step, one pass


# ----------------------------------------------------------------------------- view selection


def test_views_do_not_repeat_before_all_were_used():
    assert cycle_epochs(R, K) == 3 and cycle_epochs(7, 2) == 3
    for image in range(5):
        first = np.concatenate([select_slots(0, image, e, R, K) for e in range(3)])
        second = np.concatenate([select_slots(0, image, e, R, K) for e in range(3, 6)])
        assert sorted(first) == list(range(R)) and sorted(second) == list(range(R))
        assert np.array_equal(select_slots(0, image, 4, R, K), select_slots(0, image, 4, R, K))  # pure
        odd = np.concatenate([select_slots(1, image, e, 7, 2) for e in range(3)])
        assert len(set(odd.tolist())) == 6
    orders = [np.concatenate([select_slots(0, i, e, R, K) for e in range(3)]) for i in range(10)]
    assert len({tuple(o) for o in orders}) > 1  # a permutation per image, not one for all
    new_cycle = [np.concatenate([select_slots(0, i, e, R, K) for e in range(3, 6)]) for i in range(10)]
    assert any(not np.array_equal(a, b) for a, b in zip(orders, new_cycle))  # new order after a cycle
    assert not np.array_equal(select_slots(0, 1, 0, R, K), select_slots(1, 1, 0, R, K)) or \
        not np.array_equal(select_slots(0, 2, 0, R, K), select_slots(1, 2, 0, R, K))
    assert reuse_warning(R, K, 3) is None and "epochs 4-5 reuse them" in reuse_warning(R, K, 5)
    with pytest.raises(ConfigError, match="--crops-per-image 8 is more than the store's 6"):
        cycle_epochs(R, 8)


# ----------------------------------------------------------------------------- replay


def test_replay_at_the_teacher_size_reproduces_the_stored_views(data_root, store_path, teacher_ckpt):
    store = TargetStore.open(store_path)
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    cfg = store_views(store)
    data = ReplayDataset(ds, StoreViews(store, K, seed=3), cfg, cfg.size, render_teacher=True)
    teacher, _ = load_teacher(str(teacher_ckpt))
    for i, epoch in [(0, 0), (7, 1), (39, 4)]:
        views, targets, idx, slots, tviews = data[(i, epoch)]
        assert views.shape == (K, 3, 32, 32) and views.dtype == torch.uint8 and idx == i
        assert np.array_equal(slots.numpy(), select_slots(3, i, epoch, R, K))
        params, stored = store.read(i, slots.numpy())
        img = pil_to_uint8_tensor(ds.load(i))
        expected = torch.stack([render_view(img, p, cfg) for p in params])
        assert torch.equal(views, expected) and torch.equal(tviews, expected)
        assert torch.equal(targets, torch.from_numpy(stored))
        fresh = teacher(views)
        cos = torch.nn.functional.cosine_similarity(fresh, targets, dim=1)
        assert cos.min() > 0.999, cos


def test_replay_at_a_lower_student_size_keeps_the_crop(data_root, store_path):
    from torchvision.transforms.v2 import functional as TF

    store = TargetStore.open(store_path)
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    cfg = store_views(store)
    data = ReplayDataset(ds, StoreViews(store, K, seed=0), cfg, 16, render_teacher=True)
    diffs, wrong = [], []
    for i in range(0, 40, 4):
        views, _, _, slots, tviews = data[(i, 0)]
        assert views.shape == (K, 3, 16, 16) and tviews.shape == (K, 3, 32, 32)
        down = TF.resize(tviews, [16, 16], antialias=True).float()
        diffs.append((views.float() - down).abs().mean().item())
        wrong.append((views.float() - TF.horizontal_flip(down)).abs().mean().item())
    # the student's view is the teacher's view at a lower resolution, not another crop
    assert np.mean(diffs) < 8 and np.mean(diffs) < 0.5 * np.mean(wrong), (diffs, wrong)


def test_fresh_views_change_every_epoch_and_are_never_stored_ones(data_root, store_path):
    store = TargetStore.open(store_path)
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    cfg = store_views(store)
    fresh = FreshViews(cfg, K, seed=0)  # same seed as the store
    data = ReplayDataset(ds, fresh, cfg, 24, render_teacher=True)
    v0, t0, _, s0, tv0 = data[(5, 0)]
    v1, _, _, s1, _ = data[(5, 1)]
    assert t0.shape == (K, 0) and tv0.shape == (K, 3, 32, 32) and v0.shape == (K, 3, 24, 24)
    assert s0.min() >= FRESH_SLOT_BASE and not torch.equal(v0, v1)
    params = fresh.take(5, 0, 32, 32)[1]
    stored = store.params_batch(5, np.arange(R))
    assert not any(np.array_equal(p, q) for p in params for q in stored)
    assert torch.equal(v0, data[(5, 0)][0])  # a pure function of the key


def test_extra_augmentation_is_seeded_and_off_by_default(data_root, store_path):
    store = TargetStore.open(store_path)
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    cfg = store_views(store)
    plain = ReplayDataset(ds, StoreViews(store, K, 0), cfg, 24)
    aug = ReplayDataset(ds, StoreViews(store, K, 0), cfg, 24, extra_aug=True)
    changed = [not torch.equal(plain[(i, 0)][0], aug[(i, 0)][0]) for i in range(8)]
    assert any(changed)
    assert torch.equal(aug[(3, 2)][0], aug[(3, 2)][0])


def test_fast_decode_shrinks_large_jpegs_only_as_far_as_the_crops_allow(tmp_path):
    from fkd_ssl.data.datasets import ImageFolderDataset

    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:300, 0:400]
    arr = np.stack([(xx * 255 // 400), (yy * 255 // 300), ((xx + yy) % 256)], -1).astype(np.uint8)
    Image.fromarray(arr).save(folder / "0.jpg", quality=95)
    ds = ImageFolderDataset(tmp_path / "imgs", "train")
    full = decode_rgb(ds, 0)
    assert full.shape == (3, 300, 400)
    assert decode_rgb(ds, 0, (0.5, 0.5), 32).shape == (3, 75, 100)  # 1/4: crops of 150 px -> 37 >= 32
    assert decode_rgb(ds, 0, (0.3, 0.3), 32).shape == (3, 150, 200)  # 90 px crops allow 1/2 only
    assert decode_rgb(ds, 0, (0.2, 0.2), 32).shape == (3, 300, 400)  # 60 px crops: 1/2 would give 30 < 32
    assert decode_rgb(ds, 0, (0.05, 0.05), 32).shape == (3, 300, 400)
    cfg = ViewConfig(size=32, photometric=False)
    p = np.zeros(VIEW_PARAM_DIM, dtype=np.float32)
    p[:4] = (0.1, 0.2, 0.5, 0.5)
    a = render_view(full, p, cfg).float()
    b = render_view(decode_rgb(ds, 0, (0.5, 0.5), 32), p, cfg).float()
    assert (a - b).abs().mean() < 4


# ----------------------------------------------------------------------------- the task


def _student(dim: int = 16, predictor: int = 0) -> Encoder:
    torch.manual_seed(0)
    return build_student("resnet10t", "small", 24, dim, head_hidden=32, predictor_hidden=predictor)


def _batch(data, images, epoch=0) -> ReplayBatch:
    return default_collate([data[(i, epoch)] for i in images])


@pytest.mark.parametrize("loss_name", LOSSES)
def test_a_few_steps_lower_each_loss(data_root, store_path, loss_name):
    store = TargetStore.open(store_path)
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    data = ReplayDataset(ds, StoreViews(store, K, 0), store_views(store), 24)
    batch = _batch(data, list(range(8)))
    task = DistillTask(_student(), DistillLoss(loss_name, 16, queue_size=16))  # the queue holds this batch
    opt = torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9)
    task.train()
    losses = []
    for _ in range(14):
        loss, metrics = task(batch, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and metrics["loss_distill"] == pytest.approx(losses[-1])
    # step 0 sees an empty queue and the first updates may overshoot: compare with the early peak
    early = max(losses[1:4])
    assert np.mean(losses[-3:]) < early - 0.05 * abs(early), losses


def test_online_replay_teacher_gives_the_stored_targets(data_root, store_path, teacher_ckpt):
    store = TargetStore.open(store_path)
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    cfg = store_views(store)
    stored = _batch(ReplayDataset(ds, StoreViews(store, K, 0), cfg, 24), [1, 2, 3, 4])
    online = _batch(ReplayDataset(ds, StoreViews(store, K, 0, read_targets=False), cfg, 24, render_teacher=True),
                    [1, 2, 3, 4])
    assert torch.equal(stored.views, online.views) and online.targets.shape == (4, K, 0)
    teacher, _ = load_teacher(str(teacher_ckpt))
    loss = DistillLoss("cosine", 16)
    a = DistillTask(_student(), loss).eval()
    b = DistillTask(_student(), loss, teacher=teacher).eval()
    with torch.no_grad():
        la, ma = a(stored)
        lb, mb = b(online)
    assert la.item() == pytest.approx(lb.item(), abs=2e-3)
    assert "teacher" not in dict(b.named_modules()) and not any("teacher" in k for k in b.state_dict())


def test_student_checks():
    assert check_head_dim(None, 16) == 16
    with pytest.raises(ConfigError, match="--head-dim 8 does not match the store's targets, which have dim 16"):
        check_head_dim(8, 16)
    with pytest.raises(ConfigError, match="--ssl simsiam needs a predictor"):
        DistillTask(_student(), DistillLoss("cosine", 16), ssl="simsiam")
    with pytest.raises(ConfigError, match="head dim 16 does not match the target dim 12"):
        DistillTask(_student(), DistillLoss("cosine", 12))


def _run(out, data_root, store_path, max_minutes=0.0, ssl="moco"):
    store = TargetStore.open(store_path)
    ds = build_dataset(TINY, "train", data_root, verbose=False)
    data = ReplayDataset(ds, StoreViews(store, K, 0), store_views(store), 24, extra_aug=True)
    task = DistillTask(_student(16, predictor=8 if ssl == "simsiam" else 0), DistillLoss("infonce", 16, queue_size=24),
                       ssl=ssl, ssl_queue_size=16)
    cfg = TrainConfig(epochs=2, batch_size=8, workers=0, seed=0, optim=OptimConfig(lr=0.1, warmup_epochs=0.5),
                      max_minutes=max_minutes, log_every=1)
    return task, train(task, data, store.valid_indices(), cfg, CPU, out, {"method": "fkd_ssl"})


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path, data_root, store_path):
    full, res = _run(tmp_path / "a", data_root, store_path)
    assert res.finished and res.steps == 10
    _, res1 = _run(tmp_path / "b", data_root, store_path, max_minutes=1e-9)  # stops after its first step
    assert not res1.finished and res1.steps == 1
    resumed, res2 = _run(tmp_path / "b", data_root, store_path)
    assert res2.finished and res2.steps == 10
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = full.extra_state(), resumed.extra_state()
    assert torch.equal(sa["loss"]["queue"]["bank"], sb["loss"]["queue"]["bank"])
    assert sa["loss"]["queue"]["filled"] == 24 and torch.equal(sa["ssl"]["queue"], sb["ssl"]["queue"])


# ----------------------------------------------------------------------------- the script


def test_script_store_mode_exports_a_model_the_evaluators_read(tmp_path, data_root, store_path, capsys):
    script = _script()
    out = tmp_path / "fkd"
    assert script.main(_args(data_root, store_path, out, "--epochs", str(4 * K))) == 0
    text = capsys.readouterr().out
    assert "epochs 4-4 reuse them" in text and "student: " in text
    meta = json.loads((out / "model.json").read_text())
    assert meta["method"] == "fkd_ssl" and meta["loss"] == "infonce" and meta["epochs"] == 4
    assert meta["teacher_hash"] == TargetStore.open(store_path).identity.teacher["hash"]
    assert meta["store"]["views_per_image"] == R and meta["store"]["identity"]["dataset"]["fingerprint"]
    assert meta["views"]["size"] == 24 and meta["teacher_views"]["size"] == 32
    model, _ = load_model(out / "model.safetensors")
    assert model.spec.head_out == 16 and model.spec.input_size == 24
    assert model.features(torch.zeros(2, 3, 24, 24)).shape == (2, model.feature_dim)
    assert script.main(_args(data_root, store_path, out, "--epochs", str(4 * K))) == 0  # a rerun: nothing to do
    assert "already trained" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="holds a run with other settings.*loss"):
        script.main(_args(data_root, store_path, out, "--epochs", str(4 * K), "--loss", "seed"))


def test_script_online_teacher_baseline(tmp_path, data_root, store_path, teacher_ckpt):
    out = tmp_path / "online"
    # no store: fresh views from the default (gen_targets) distribution at the teacher's size
    assert _script().main(_args(data_root, None, out, "--online-teacher", str(teacher_ckpt), "--loss", "soft-ce")) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["method"] == "kd_online" and meta["targets"] == "online" and meta["loss"] == "soft-ce"
    assert meta["store"] is None and meta["teacher_views"]["size"] == 32 and meta["teacher_views"]["photometric"]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5 and np.isfinite(rows[-1]["loss"])
    # the teacher recomputes the targets of the stored views
    replay = tmp_path / "replay"
    assert _script().main(_args(data_root, store_path, replay, "--online-teacher", str(teacher_ckpt),
                                "--online-replay")) == 0
    meta = json.loads((replay / "model.json").read_text())
    assert meta["method"] == "kd_online_replay" and meta["store"]["views_per_image"] == R


@pytest.mark.parametrize("extra, message", [
    (["--head-dim", "8"], "--head-dim 8 does not match the store's targets, which have dim 16"),
    (["--crops-per-image", "7"], "--crops-per-image 7 is more than the store's 6 views per image"),
    (["--loss", "seed", "--multi-positive"], "--multi-positive applies to --loss infonce only"),
])
def test_script_refuses_incompatible_settings(tmp_path, data_root, store_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        _script().main(_args(data_root, store_path, tmp_path / "o", *extra))
    assert not (tmp_path / "o" / "config.json").exists()  # a refused run does not claim --out


def test_script_refuses_a_store_of_another_dataset(tmp_path, data_root, store_path):
    res = subprocess.run([sys.executable, str(ROOT / SCRIPT), *_args(data_root, store_path, tmp_path / "o"),
                          "--data", "synthetic:train=20,val=10,size=32"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"--store {store_path} holds targets for another dataset" in res.stderr
    assert "--data synthetic:size=32,train=20,val=10" in res.stderr and "gen_targets.py" in res.stderr
    assert not (tmp_path / "o" / "config.json").exists()


def test_torchrun_two_processes(tmp_path, data_root, store_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / SCRIPT), *_args(data_root, store_path, out, "--batch-size", str(4 * K), "--ssl",
                                                     "moco")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("student: ") == 1  # only rank 0 reports and writes
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 // 8 and rows[-1]["negatives"] > 15  # the queue holds both ranks' targets
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["batch_size"] == 4 * K and meta["epochs"] == 1 and meta["method"] == "fkd_ssl"
