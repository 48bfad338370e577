"""gen_targets.py: replay fidelity, reproducibility (workers, resume after SIGKILL, torchrun),
bad images, and refusing to mix stores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, run_script
from fkd_ssl.checkpoint import save_model
from fkd_ssl.data import build_dataset, pil_to_uint8_tensor
from fkd_ssl.models import Encoder, ModelSpec
from fkd_ssl.store import TargetStore
from fkd_ssl.teacher import load_teacher
from fkd_ssl.views import ViewConfig, render_view

SCRIPT = "experiments/gen_targets.py"


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=32, head="moco", head_hidden=64, head_out=32))
    with torch.no_grad():  # BN statistics that make outputs depend on the input
        model.train()
        model.project(torch.randn(64, 3, 32, 32))
    return save_model(tmp_path_factory.mktemp("teacher") / "model", model.eval(), {"method": "test"})


def _gen(data_root, teacher, out, *extra, data=TINY):
    return run_script(SCRIPT, "--data", data, "--data-root", str(data_root), "--teacher", str(teacher), "--out", str(out),
                      "--views-per-image", "4", "--batch-size", "16", "--workers", "0", "--device", "cpu",
                      "--shard-size", "16", "--group", "4", *extra)


def _files(path: Path) -> dict[str, bytes]:
    """Every store file's bytes; the header's provenance (the command line that made it, which
    names --out) is the one part allowed to differ between the runs compared here."""
    import json

    out = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name != "log.jsonl":
            data = p.read_bytes()
            if p.name in ("header.json", "manifest.json"):
                d = json.loads(data)
                assert set(d.pop("provenance")) == {"command", "git_sha", "numpy"}
                data = json.dumps(d, sort_keys=True).encode()
            out[p.name] = data
    return out


def test_replayed_views_give_the_stored_targets(tmp_path, data_root, teacher_ckpt):
    res = _gen(data_root, teacher_ckpt, tmp_path / "s")
    assert res.returncode == 0, res.stderr
    assert "store: " in res.stdout
    store = TargetStore.open(tmp_path / "s", verify=True)
    ds = build_dataset(TINY, "train", data_root)
    teacher, _ = load_teacher(str(teacher_ckpt))
    cfg = ViewConfig.from_dict(store.manifest["identity"]["views"])
    rng = np.random.default_rng(0)
    ii, rr = rng.integers(0, len(ds), 12), rng.integers(0, 4, 12)
    params = store.params_batch(ii, rr)
    views = torch.stack([render_view(pil_to_uint8_tensor(ds.load(int(i))), p, cfg) for i, p in zip(ii, params)])
    fresh = teacher(views).numpy()
    stored = store.targets(ii, rr)
    cos = (fresh * stored).sum(1) / np.linalg.norm(fresh, axis=1) / np.linalg.norm(stored, axis=1)
    assert cos.min() >= 0.999, cos
    # and the views differ from each other (the store is not degenerate)
    assert np.abs(stored[0] - stored[1]).max() > 1e-3


def test_worker_count_and_rerun_do_not_change_the_store(tmp_path, data_root, teacher_ckpt):
    assert _gen(data_root, teacher_ckpt, tmp_path / "a").returncode == 0
    res = _gen(data_root, teacher_ckpt, tmp_path / "b", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    again = _gen(data_root, teacher_ckpt, tmp_path / "a")  # finished: nothing to do, nothing changes
    assert again.returncode == 0 and "this run 0 images" in again.stdout
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_sigkill_then_rerun_gives_a_byte_identical_store(tmp_path, data_root, teacher_ckpt):
    assert _gen(data_root, teacher_ckpt, tmp_path / "ref").returncode == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / SCRIPT), "--data", TINY, "--data-root", str(data_root), "--teacher",
           str(teacher_ckpt), "--out", str(out), "--views-per-image", "4", "--batch-size", "2", "--workers", "0",
           "--device", "cpu", "--shard-size", "16", "--group", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until some records are written, then kill -9
        done = list(out.glob("shard-*.done.npy"))
        if done and any(np.load(d).any() for d in done):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    res = _gen(data_root, teacher_ckpt, out)
    assert res.returncode == 0, res.stderr
    assert _files(out) == _files(tmp_path / "ref")


def test_torchrun_two_processes_equal_one(tmp_path, data_root, teacher_ckpt):
    assert _gen(data_root, teacher_ckpt, tmp_path / "one").returncode == 0
    out = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / SCRIPT), "--data", TINY, "--data-root", str(data_root), "--teacher", str(teacher_ckpt),
                          "--out", str(out), "--views-per-image", "4", "--batch-size", "16", "--workers", "0",
                          "--device", "cpu", "--shard-size", "16", "--group", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("store: ") == 1
    assert _files(out) == _files(tmp_path / "one")


def test_refuses_to_mix_and_overwrite_replaces(tmp_path, data_root, teacher_ckpt):
    out = tmp_path / "s"
    assert _gen(data_root, teacher_ckpt, out).returncode == 0
    before = _files(out)
    res = _gen(data_root, teacher_ckpt, out, "--codec", "int8")
    assert res.returncode == 2 and "other settings" in res.stderr and "--overwrite" in res.stderr
    res = _gen(data_root, teacher_ckpt, out, "--seed", "1")
    assert res.returncode == 2 and "seed" in res.stderr
    assert _files(out) == before  # nothing lost
    res = _gen(data_root, teacher_ckpt, out, "--codec", "int8", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert TargetStore.open(out).manifest["codec"]["name"] == "int8"


def _bad_image_folder(root: Path) -> None:
    ok = root / "train" / "ok"
    odd = root / "train" / "odd"
    ok.mkdir(parents=True)
    odd.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(ok / f"{i}.jpg")
    good = (ok / "0.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (odd / "zero.jpg").write_bytes(b"")
    (odd / "garbage.png").write_bytes(b"this is not an image at all")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(odd / "sixteen.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert("P").save(odd / "palette.png")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(odd / "gray.jpg")
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(odd / "huge.jpg")
    (root / "val").mkdir()


def test_bad_images_are_converted_or_skipped(tmp_path, teacher_ckpt):
    _bad_image_folder(tmp_path / "imgs")
    res = _gen(tmp_path, teacher_ckpt, tmp_path / "s", data=f"imagefolder:{tmp_path / 'imgs'}")
    assert res.returncode == 0, res.stderr
    store = TargetStore.open(tmp_path / "s", verify=True)
    reasons = {Path(s["path"]).name: s["reason"] for s in store.manifest["skipped"]}
    assert set(reasons) == {"truncated.jpg", "zero.jpg", "garbage.png"}, reasons
    assert all("cannot decode" in r for r in reasons.values())
    ds = build_dataset(f"imagefolder:{tmp_path / 'imgs'}", "train")
    valid = set(store.valid_indices().tolist())
    assert len(valid) == len(ds) - 3
    names = {Path(ds.source(i)).name for i in valid}
    assert {"cmyk.jpg", "sixteen.png", "palette.png", "gray.jpg", "huge.jpg"} <= names


def test_default_views_follow_the_teachers_training_views(tmp_path, teacher_ckpt):
    from fkd_ssl.teacher import default_views

    teacher, _ = load_teacher(str(teacher_ckpt))  # no recorded views: MoCo v2's, at the teacher's size
    assert teacher.trained_views is None and default_views(teacher) == ViewConfig(size=32)
    model, meta = __import__("fkd_ssl.checkpoint", fromlist=["x"]).load_model(teacher_ckpt)
    trained = ViewConfig(size=48, hue=0.5, gray_p=0.5, scale=(0.3, 1.0))
    path = save_model(tmp_path / "t", model, {**meta, "views": trained.to_dict()})
    teacher, _ = load_teacher(str(path))
    views = default_views(teacher)
    assert views.size == 32 and views.hue == 0.5 and views.gray_p == 0.5 and views.scale == (0.3, 1.0)


def test_classifier_teacher_writes_topk_soft_labels(tmp_path, data_root):
    torch.manual_seed(0)
    clf = Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=32, num_classes=10)).eval()
    ckpt = save_model(tmp_path / "clf", clf, {"method": "test"})
    res = _gen(data_root, ckpt, tmp_path / "s", "--topk", "3")
    assert res.returncode == 0, res.stderr
    store = TargetStore.open(tmp_path / "s", verify=True)
    assert store.manifest["codec"]["name"] == "topk" and store.target_dim == 10
    views = store.manifest["identity"]["views"]
    assert views["photometric"] is False and views["scale"][0] == 0.08  # FKD's geometry-only crops
    probs = store.targets(np.arange(4), np.zeros(4, dtype=int))
    assert np.allclose(probs.sum(1), 1, atol=1e-2) and (probs > 0).all()  # marginal smoothing
    ds = build_dataset(TINY, "train", data_root)
    teacher, _ = load_teacher(str(ckpt))
    p = store.params(0, 0)
    fresh = teacher(render_view(pil_to_uint8_tensor(ds.load(0)), p, ViewConfig.from_dict(views))[None]).numpy()[0]
    top = np.argsort(-fresh)[:3]
    assert set(top) == set(np.argsort(-probs[0])[:3]) and np.allclose(probs[0][top], fresh[top], atol=2e-3)
