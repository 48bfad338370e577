"""Shared fixtures: a tiny generated dataset and helpers to run scripts as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = "synthetic:train=40,val=20,size=32"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root holding the tiny synthetic set (generated once per session)."""
    from fkd_ssl.data import build_dataset

    root = tmp_path_factory.mktemp("data")
    build_dataset(TINY, "train", root, verbose=False)
    return root


def run_script(script: str, *args: str, timeout: float = 300, env: dict | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python <script> args...`` from the repository root; returns the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models only lose time to a second thread on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
