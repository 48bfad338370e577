"""The engine's units: the task contract, the metrics window and the stop policy."""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest
import torch
from torch.utils.data import Dataset

from fkd_ssl.dist import DistContext
from fkd_ssl.engine import MetricsLog, OptimConfig, StopPolicy, Task, TrainConfig, train
from fkd_ssl.models import Encoder, ModelSpec

CPU = DistContext(0, 1, 0, torch.device("cpu"))


class _Batch(NamedTuple):
    views: torch.Tensor
    image: torch.Tensor


class _Views(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, key):
        i, epoch = key
        return _Batch(torch.full((3, 3, 16, 16), (i * 7 + epoch) % 256, dtype=torch.uint8), i)


class _Task(Task):
    """Regresses the mean pixel; counts each item as one image of 3 views."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=16, num_classes=1))
        self.seen: list[type] = []

    def forward(self, batch, progress: float = 0.0):
        self.seen.append(type(batch))
        x = self.prep(batch.views.flatten(0, 1))
        return (self.encoder.logits(x).squeeze(1) - x.mean((1, 2, 3))).pow(2).mean(), {"p": progress}

    def export(self) -> Encoder:
        return self.encoder


def test_train_keeps_the_named_batch_and_counts_through_the_task(tmp_path):
    task = _Task()
    cfg = TrainConfig(epochs=2, batch_size=4, workers=0, optim=OptimConfig(lr=0.01, warmup_epochs=0), log_every=1)
    res = train(task, _Views(), range(12), cfg, CPU, tmp_path, {"method": "test"})
    assert res.finished and res.steps == 6 and set(task.seen) == {_Batch}
    assert res.views_per_s == pytest.approx(3 * res.images_per_s)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[2]["p"] == pytest.approx(2 / 6)


def test_metrics_window_means_and_rates(tmp_path):
    log = MetricsLog(tmp_path, True, 0, world_size=2)
    log.add(1.0, {"m": 2.0}, images=4, views=8)
    log.add(3.0, {"m": 4.0}, images=4, views=8)
    row = log.flush(2, lr=0.1, epoch=0, elapsed=2.0)
    assert row["loss"] == 2.0 and row["m"] == 3.0 and row["images_per_s"] == 8.0 and row["views_per_s"] == 16.0
    assert log.n == 0 and not log.window  # the next row starts afresh; the rates keep counting
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 2
    resumed = MetricsLog(tmp_path, True, 1)  # rows past the resumed step are dropped
    resumed.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_stop_policy():
    timed = StopPolicy(TrainConfig(max_minutes=1.0, ckpt_minutes=0.0), CPU)
    assert timed.decide(59.0, False) == (False, False) and timed.decide(60.0, False) == (True, False)
    periodic = StopPolicy(TrainConfig(ckpt_minutes=1e-9), CPU)
    assert periodic.decide(0.0, False) == (False, True)
    assert periodic.decide(0.0, True) == (False, False)  # the epoch end saves anyway
    periodic.saved()
    periodic.last_save += 3600
    assert periodic.decide(0.0, False) == (False, False)
