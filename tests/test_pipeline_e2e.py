"""End to end, as a user runs it (slow: ``python -m pytest -m slow``): teacher -> store -> FKD
student -> evaluators, on a small synthetic set, through the scripts and their default paths."""

from __future__ import annotations

import json

import pytest

from conftest import run_script

DATA = "synthetic:train=120,val=40,size=48"


@pytest.mark.slow
def test_teacher_store_student_eval(tmp_path):
    root = ["--data", DATA, "--data-root", str(tmp_path / "data"), "--device", "cpu", "--workers", "0"]
    small = ["--arch", "resnet10t", "--input-size", "32", "--batch-size", "16", "--epochs", "2"]
    res = run_script("experiments/pretrain_teacher.py", *root, *small, "--queue-size", "64", "--proj-hidden", "64",
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    teacher = next((tmp_path / "runs").glob("teacher-*/model.safetensors"))
    res = run_script("experiments/gen_targets.py", *root, "--views-per-image", "4", "--batch-size", "32", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    store = next((tmp_path / "runs").glob("store-*"))
    assert json.loads((store / "manifest.json").read_text())["identity"]["views"]["hue"] == 0.5  # teacher's views
    # the student counts samples (views): 2 passes at K = 2, 16 images x 2 views per step
    student_args = ["--arch", "resnet10t", "--input-size", "32", "--crops-per-image", "2", "--batch-size", "32",
                    "--epochs", "4", "--lr", "0.03", "--warmup-epochs", "2"]
    res = run_script("experiments/distill_ssl.py", *root, *student_args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    student = next((tmp_path / "runs").glob("distill-*/model.safetensors"))
    assert json.loads(student.with_suffix(".json").read_text())["method"] == "fkd_ssl"
    for ckpt in (teacher, student):
        res = run_script("eval/knn.py", "--checkpoint", str(ckpt), *root[:4], "--k", "10,20", "--results",
                         str(tmp_path / "results.jsonl"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(r) for r in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} >= {"moco", "fkd_ssl"}
