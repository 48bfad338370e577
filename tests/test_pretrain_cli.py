"""experiments/pretrain_teacher.py as a user runs it: train, resume, errors, torchrun."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, TINY, run_script

SCRIPT = "experiments/pretrain_teacher.py"
SMALL = ["--data", TINY, "--arch", "resnet10t", "--stem", "small", "--input-size", "32", "--batch-size", "8",
         "--workers", "0", "--queue-size", "16", "--proj-dim", "16", "--proj-hidden", "32", "--device", "cpu"]


def _args(data_root, out, *extra):
    return [*SMALL, "--data-root", str(data_root), "--out", str(out), *extra]


def test_train_interrupt_and_resume(tmp_path, data_root):
    out = tmp_path / "teacher"
    first = run_script(SCRIPT, *_args(data_root, out, "--epochs", "2", "--max-minutes", "0.0000001"))
    assert first.returncode == 0, first.stderr
    state_meta = (out / "config.json").read_text()
    assert json.loads(state_meta)["git_sha"]
    second = run_script(SCRIPT, *_args(data_root, out, "--epochs", "2"))
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "teacher: " in second.stdout
    meta = json.loads((out / "model.json").read_text())
    assert meta["epochs"] == 2 and meta["method"] == "moco" and meta["model"]["arch"] == "resnet10t"
    assert meta["dataset"]["fingerprint"] and meta["config"]["seed"] == 0
    third = run_script(SCRIPT, *_args(data_root, out, "--epochs", "2"))
    assert third.returncode == 0 and "already trained" in third.stdout
    other = run_script(SCRIPT, *_args(data_root, out, "--epochs", "3"))
    assert other.returncode == 2 and "holds a run with other settings" in other.stderr and "epochs" in other.stderr


@pytest.mark.parametrize("flags, message", [
    (["--arch", "resnet_nope"], "--arch 'resnet_nope': unknown timm model"),
    (["--data", "imagefolder:/nonexistent/set"], "/nonexistent/set does not exist"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "-3"], "--batch-size must be >= 1"),
    (["--crop-min", "1.5"], "--crop-min must be <= 1"),
])
def test_user_errors_are_one_line(tmp_path, data_root, flags, message):
    res = run_script(SCRIPT, *_args(data_root, tmp_path / "o"), *flags)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_out_is_a_file(tmp_path, data_root):
    (tmp_path / "f").write_text("precious")
    res = run_script(SCRIPT, *_args(data_root, tmp_path / "f"))
    assert res.returncode == 2 and "is a file" in res.stderr
    assert (tmp_path / "f").read_text() == "precious"


def test_torchrun_two_processes(tmp_path, data_root):
    import os
    import subprocess

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / SCRIPT), *_args(data_root, out, "--epochs", "1", "--batch-size", "4")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("teacher: ") == 1  # only rank 0 reports and writes
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 // 8  # global batch 2 x 4 over 40 images
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["batch_size"] == 4 and meta["epochs"] == 1
