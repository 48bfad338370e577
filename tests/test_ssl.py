"""SSL teachers and the training engine: losses against references, learning, exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from fkd_ssl.data import build_dataset
from fkd_ssl.dist import DistContext
from fkd_ssl.engine import OptimConfig, TrainConfig, lr_at, train
from fkd_ssl.models import Encoder, ModelSpec
from fkd_ssl.objectives.moco import infonce
from fkd_ssl.ssl import MoCo, SimSiam
from fkd_ssl.views import RandomViewsDataset, ViewConfig, ViewsBatch

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def _encoder(method: str) -> Encoder:
    torch.manual_seed(0)
    return Encoder(ModelSpec(arch="resnet10t", stem="small", input_size=32, head="moco" if method == "moco" else "simsiam",
                             head_hidden=64, head_out=32, predictor_hidden=16 if method == "simsiam" else 0))


def test_infonce_matches_lightly_ntxent_with_memory_bank():
    from lightly.loss import NTXentLoss

    torch.manual_seed(1)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    ref = NTXentLoss(temperature=0.2, memory_bank_size=(32, 16))
    bank = ref.memory_bank.bank.clone()  # (N, D), unit rows
    expected = ref(q, k)
    ours = infonce(F.normalize(q, dim=1), F.normalize(k, dim=1), bank, 0.2)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_objectives_match_float64_references():
    import numpy as np

    from fkd_ssl.objectives.simsiam import simsiam_loss

    g = np.random.default_rng(0)
    z1, z2, p1, p2 = (g.standard_normal((5, 8)) for _ in range(4))

    def cos(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    t = [torch.from_numpy(a) for a in (z1, z2, p1, p2)]
    assert simsiam_loss(*t).item() == pytest.approx(-0.5 * (cos(p1, z2).mean() + cos(p2, z1).mean()), rel=1e-9)
    q, k, neg = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (z1, z2, g.standard_normal((6, 8))))
    logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ neg.T], 1) / 0.2
    ref = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])
    got = infonce(*(torch.from_numpy(a) for a in (q, k, neg)), 0.2).item()
    assert got == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("method", ["moco", "simsiam"])
def test_a_few_steps_lower_the_loss(method):
    enc = _encoder(method)
    task = MoCo(enc, queue_size=16, temperature=0.2, momentum=0.9) if method == "moco" else SimSiam(enc)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    noise = torch.randint(-20, 21, (16, 2, 3, 32, 32), generator=g)
    views = (base[:, None].int() + noise).clamp(0, 255).to(torch.uint8)  # two noisy views of each image
    opt = torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9)
    task.train()
    losses = []
    for _ in range(15):
        loss, metrics = task(ViewsBatch(views, None, None), 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # (MoCo's first loss is against a random queue; from step 1 on the queue holds real keys)
    start = losses[1] if method == "moco" else losses[0]
    assert sum(losses[-3:]) / 3 < start - 0.05, losses


def test_moco_queue_is_saved_and_restored():
    task = MoCo(_encoder("moco"), queue_size=32)
    task.objective.queue.bank.normal_()
    task.objective.queue.bank_ptr.fill_(7)
    state = task.extra_state()
    other = MoCo(_encoder("moco"), queue_size=32)
    other.load_extra_state(state)
    assert torch.equal(other.objective.queue.bank, task.objective.queue.bank)
    assert int(other.objective.queue.bank_ptr) == 7


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)


def _run(out, data_root, max_minutes=0.0):
    ds = RandomViewsDataset(build_dataset(TINY, "train", data_root), ViewConfig(size=32), seed=0)
    task = MoCo(_encoder("moco"), queue_size=16)
    cfg = TrainConfig(epochs=2, batch_size=8, workers=0, seed=0, optim=OptimConfig(lr=0.1, warmup_epochs=0.5),
                      max_minutes=max_minutes, log_every=1)
    result = train(task, ds, range(len(ds)), cfg, CPU, out, {"method": "moco"})
    return task, result


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path, data_root):
    full, res = _run(tmp_path / "a", data_root)
    assert res.finished and res.epochs_done == 2 and res.steps == 10
    part, res1 = _run(tmp_path / "b", data_root, max_minutes=1e-9)  # stops after its first step
    assert not res1.finished and res1.steps == 1
    resumed, res2 = _run(tmp_path / "b", data_root)
    assert res2.finished and res2.steps == 10
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    rows = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 10 + 2 * 0  # one row per step, none duplicated by the resume
    again, res3 = _run(tmp_path / "a", data_root)  # a finished run is not trained again
    assert res3.steps == 10 and (tmp_path / "a" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["moco", "simsiam"])
def test_the_students_ssl_term_is_the_teachers_objective(method):
    from fkd_ssl.distill import DistillTask
    from fkd_ssl.losses import DistillLoss
    from fkd_ssl.replay import ReplayBatch

    enc = _encoder(method)
    views = torch.randint(0, 256, (4, 2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)  # the same initial queue for both
    teacher = (MoCo(enc, queue_size=16) if method == "moco" else SimSiam(enc)).eval()
    torch.manual_seed(5)
    student = DistillTask(enc, DistillLoss("cosine", 32), ssl=method, ssl_queue_size=16).eval()
    with torch.no_grad():
        want, _ = teacher(ViewsBatch(views, None, None))
        _, metrics = student(ReplayBatch(views, torch.randn(4, 2, 32), torch.arange(4), None, None))
    assert metrics["loss_ssl"] == pytest.approx(float(want), abs=1e-5)
