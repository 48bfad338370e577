"""The floor plan: every entry point is a command of ``fkd_ssl.commands`` with a console script, the
scripts outside the package are shims, the package never loads a script, and the students' budget
flags convert to the engine's passes in one place.  The slow test installs the package (not
editable) into a fresh venv and runs every console script from an empty folder."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT
from fkd_ssl.commands import NAMES, script_name
from fkd_ssl.errors import ConfigError
from fkd_ssl.training_data import train_config

SHIMS = sorted([*ROOT.glob("experiments/*.py"), *ROOT.glob("eval/*.py")])


def test_every_command_has_a_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {script_name(n): f"fkd_ssl.commands.{n}:console" for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_command_contract_and_help(name, capsys):
    mod = importlib.import_module(f"fkd_ssl.commands.{name}")
    for attr in ("build_parser", "run", "main", "console"):
        assert callable(getattr(mod, attr)), attr
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("shim", SHIMS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_are_shims(shim):
    text = shim.read_text()
    assert len(text.splitlines()) <= 40
    assert re.search(r"^from fkd_ssl\.commands\.\w+ import console", text, re.M)
    assert "sys.path" not in text


def test_the_package_loads_no_script_and_leaves_sys_path_alone():
    bad = re.compile(r"sys\.path|spec_from_file_location|^\s*(?:from|import)\s+(?:experiments|eval|bench)\b", re.M)
    for path in (ROOT / "fkd_ssl").rglob("*.py"):
        m = bad.search(path.read_text())
        assert m is None, f"{path.relative_to(ROOT)}: {m and m.group(0)}"


def test_data_does_not_import_cli():
    """cli -> data, never back (no import cycle, also not hidden in a function)."""
    for path in (ROOT / "fkd_ssl" / "data").glob("*.py"):
        assert not re.search(r"from \.\.cli import|from \.\. import cli|fkd_ssl\.cli", path.read_text()), path.name
    code = "import sys, fkd_ssl.data; sys.exit('fkd_ssl.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def _budget(epochs, batch, lr, warmup):
    return argparse.Namespace(epochs=epochs, batch_size=batch, lr=lr, warmup_epochs=warmup, optimizer="sgd",
                              weight_decay=0.0, workers=0, seed=0, no_amp=False, max_minutes=0.0)


def test_samples_convert_to_passes_images_and_lr_per_image():
    cfg = train_config(_budget(80, 512, 0.015, 4.0), k=4)  # distill_ssl's earlier defaults
    assert (cfg.epochs, cfg.batch_size, cfg.optim.warmup_epochs) == (20, 128, 1.0)
    assert cfg.optim.lr == pytest.approx(0.06)  # per 256 images: 256 images are 1024 views
    one = train_config(_budget(5, 64, 0.06, 1.0), k=1)  # a sample is an image: nothing changes
    assert (one.epochs, one.batch_size, one.optim.lr, one.optim.warmup_epochs) == (5, 64, 0.06, 1.0)
    with pytest.raises(ConfigError, match="--epochs 6 must be a multiple of --crops-per-image 4"):
        train_config(_budget(6, 512, 0.1, 0.0), k=4)
    with pytest.raises(ConfigError, match=r"--batch-size 6 \(samples per step\) must be a multiple"):
        train_config(_budget(8, 6, 0.1, 0.0), k=4)


def test_distill_ssl_defaults_count_samples():
    from fkd_ssl.commands import distill_ssl

    a = distill_ssl.build_parser().parse_args([])
    assert (a.epochs, a.batch_size, a.crops_per_image) == (80, 512, 4)  # 20 passes of 128 images x 4 views
    assert (a.optimizer, a.lr, a.weight_decay, a.warmup_epochs, a.center) == ("adamw", 5e-3, 0.05, 1.0, False)
    for flag in ("--epochs", "--batch-size", "--lr", "--warmup-epochs"):
        assert flag in distill_ssl.build_parser().format_help()


def test_quickstart_stages_print_console_commands(tmp_path):
    from fkd_ssl import pipeline

    stages = pipeline.plan(tmp_path, pipeline.FAST, str(tmp_path / "data"), "cpu", 0)
    assert {s.command for s in stages} <= set(NAMES)
    line = next(s for s in stages if s.command == "distill_sup").command_line()
    assert line.startswith("fkd-distill-sup --data ")


@pytest.mark.slow
def test_non_editable_install_runs_from_any_folder(tmp_path):
    """``pip install .`` (not editable) into a venv that sees this interpreter's packages; then,
    from an empty folder, every console script answers --help and ``fkd-quickstart --fast`` runs."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", "build"))
    venv = tmp_path / "venv"
    # without its own pip: this interpreter's pip and setuptools (seen through the system site) build the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    py, bin_ = venv / "bin" / "python", venv / "bin"
    pip = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                          str(src)], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(src)  # nothing may come from the source tree
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1",
                                                                        "PATH": f"{bin_}:{os.environ['PATH']}"}
    where = subprocess.run([str(py), "-c", "import fkd_ssl; print(fkd_ssl.__file__)"], capture_output=True,
                           text=True, cwd=empty, env=env, timeout=120)
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the installed copy, not a checkout
    for name in NAMES:
        res = subprocess.run([str(bin_ / script_name(name)), "--help"], capture_output=True, text=True, cwd=empty,
                             env=env, timeout=300)
        assert res.returncode == 0 and "usage:" in res.stdout, (name, res.stderr[-2000:])
    res = subprocess.run([str(bin_ / "fkd-quickstart"), "--fast", "--device", "cpu", "--workers", "0",
                          "--data-root", str(tmp_path / "data")], capture_output=True, text=True, cwd=empty,
                         env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (empty / "runs" / "quickstart-fast" / "report.md").read_text().count("`fkd-") >= 15
