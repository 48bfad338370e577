"""The one-command pipeline (experiments/quickstart.py --fast), as CI runs it: every stage, the
table, the figure and the report; a rerun skips finished stages; the console script exists."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script

EXPECTED = {"MoCo teacher", "FKD student (MoCo store)", "FKD student (EffNet store)", "online-teacher student (MoCo)",
            "MoCo alone (student arch, FKD's time)", "classifier teacher", "FKD student (soft labels)",
            "FKD student (EffNet soft labels)", "plain-label student", "ReLabel student",
            "EfficientNet-Lite0 teacher (ImageNet)", "random init (resnet10t)", "raw pixels"}
UNTRAINED = {"EfficientNet-Lite0 teacher (ImageNet)", "random init (resnet10t)", "raw pixels"}


def test_fast_quickstart_runs_everything_and_resumes(tmp_path):
    out, root = tmp_path / "qs", tmp_path / "data"
    args = ["--fast", "--data-root", str(root), "--out", str(out), "--device", "cpu", "--workers", "0"]
    t0 = time.time()
    proc = run_script("experiments/quickstart.py", *args, timeout=600, env={"OMP_NUM_THREADS": "2"})
    first = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    with open(out / "summary.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == EXPECTED
    for name, r in rows.items():  # every model was judged by both evaluators
        assert 0.0 <= float(r["knn_top1"]) <= 100.0 and 0.0 <= float(r["linear_top1"]) <= 100.0, name
    for name in EXPECTED - UNTRAINED:
        assert float(rows[name]["train_s"]) > 0, name
    assert rows["EfficientNet-Lite0 teacher (ImageNet)"]["variant"] == "reference"
    assert rows["raw pixels"]["variant"] == "baseline"
    for name in ("FKD student (MoCo store)", "FKD student (EffNet store)", "FKD student (soft labels)",
                 "FKD student (EffNet soft labels)", "ReLabel student"):
        assert float(rows[name]["store_mb"]) > 0, name
    assert float(rows["MoCo alone (student arch, FKD's time)"]["views_per_s"]) > 0
    report = (out / "report.md").read_text()
    assert "| FKD student (soft labels) | sup | classifier |" in report and "accuracy_vs_time.png" in report
    assert "python experiments/distill_sup.py" in report  # every stage says how to reproduce it
    assert (out / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ledger = json.loads((out / "pipeline.json").read_text())["stages"]
    assert len(ledger) == 15 + 2 * len(EXPECTED)  # training stages + kNN and probe of each

    t0 = time.time()
    again = run_script("experiments/quickstart.py", *args, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(": done (") == len(ledger) and time.time() - t0 < first
    assert json.loads((out / "pipeline.json").read_text())["stages"] == ledger


def test_console_script_is_declared_and_runs():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert eps.get("fkd-quickstart") == "fkd_ssl.pipeline:console_main"
    exe = shutil.which("fkd-quickstart")
    cmd = [exe, "--help"] if exe else [sys.executable, "-c", "from fkd_ssl.pipeline import console_main; console_main()",
                                       "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "--fast" in proc.stdout


@pytest.mark.slow
def test_fast_quickstart_under_torchrun(tmp_path):
    """Two processes: every stage runs on both ranks (DDP), rank 0 alone keeps the ledger and
    writes each result once; a rerun under torchrun skips every stage."""
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "experiments" / "quickstart.py"), "--fast", "--data-root", str(tmp_path / "data"), "--out",
           str(out), "--device", "cpu", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("quick start: ") == 1 and "2 process(es)" in (out / "report.md").read_text()
    with open(out / "summary.csv") as f:
        assert {r["model"] for r in csv.DictReader(f)} == EXPECTED
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keys = [(r["model"], r["protocol"], r.get("k")) for r in rows]
    assert len(keys) == len(set(keys))  # each evaluation written once, by rank 0
    ledger = json.loads((out / "pipeline.json").read_text())["stages"]
    assert len(ledger) == 15 + 2 * len(EXPECTED)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(": done (") == len(ledger)
