"""Distillation losses against plain float64 reference implementations (loops over rows),
the target queue, and DistillLoss across two DDP ranks."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from fkd_ssl import losses as L
from fkd_ssl.errors import ConfigError


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(-1, keepdims=True))


def _logsumexp(v: np.ndarray) -> float:
    m = v.max()
    return float(m + math.log(np.exp(v - m).sum()))


def _ref_infonce(s, keys, pos_sets, T):
    """Row by row: mean over positives of -(logit_p - logsumexp(all logits))."""
    s, keys = _unit(s), _unit(keys)
    total = 0.0
    for n in range(len(s)):
        logits = np.array([float(np.dot(s[n], k)) / T for k in keys])
        lse = _logsumexp(logits)
        total += sum(lse - logits[p] for p in pos_sets[n]) / len(pos_sets[n])
    return total / len(s)


def _ref_soft_ce(s, t, tau):
    s, t = _unit(s), _unit(t)
    total = 0.0
    for n in range(len(s)):
        q = np.exp(t[n] / tau - _logsumexp(t[n] / tau))
        total += -sum(q[d] * (s[n, d] / tau - _logsumexp(s[n] / tau)) for d in range(s.shape[1]))
    return total / len(s)


def _ref_seed(s, t, queue, tau_t, tau_s):
    s, t, queue = _unit(s), _unit(t), _unit(queue) if len(queue) else queue
    total = 0.0
    for n in range(len(s)):
        refs = [t[n]] + list(queue)
        ls = np.array([np.dot(s[n], r) for r in refs]) / tau_s
        lt = np.array([np.dot(t[n], r) for r in refs]) / tau_t
        pt = np.exp(lt - _logsumexp(lt))
        total += -float((pt * (ls - _logsumexp(ls))).sum())
    return total / len(s)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_contrastive_single_and_multi_positive():
    s, keys = _rand(6, 8, seed=1), _rand(10, 8, seed=2)
    own = [[n] for n in range(6)]
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[range(6), range(6)] = True
    got = L.contrastive(_t(s), _t(keys), mask, 0.2).item()
    assert got == pytest.approx(_ref_infonce(s, keys, own, 0.2), rel=1e-9)
    # views 2n and 2n+1 belong to image n: each has two positives
    multi = [[2 * (n // 2), 2 * (n // 2) + 1] for n in range(6)]
    mask = torch.zeros(6, 10, dtype=torch.bool)
    for n, ps in enumerate(multi):
        mask[n, ps] = True
    got = L.contrastive(_t(s), _t(keys), mask, 0.1).item()
    assert got == pytest.approx(_ref_infonce(s, keys, multi, 0.1), rel=1e-9)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_soft_ce(tau):
    s, t = _rand(5, 7, seed=3) * 3, _rand(5, 7, seed=4)
    assert L.soft_ce(_t(s), _t(t), tau).item() == pytest.approx(_ref_soft_ce(s, t, tau), rel=1e-9)


@pytest.mark.parametrize("q", [0, 9])
def test_seed(q):
    s, t, queue = _rand(4, 6, seed=5), _rand(4, 6, seed=6), _rand(q, 6, seed=7)
    got = L.seed(_t(s), _t(t), _t(queue).reshape(q, 6), 0.05, 0.2).item()
    assert got == pytest.approx(_ref_seed(s, t, queue, 0.05, 0.2), rel=1e-9)


def test_seed_with_a_sharp_teacher_is_infonce_against_the_queue():
    s, t, queue = _rand(4, 6, seed=8), _rand(4, 6, seed=9), _rand(12, 6, seed=10)
    # only t_n among [t_n; queue] has similarity 1 with t_n, so tau_t -> 0 makes the teacher one-hot:
    # SEED becomes InfoNCE of s_n with the keys [t_n; queue] and t_n the positive
    ref = np.mean([_ref_infonce(s[n:n + 1], np.concatenate([t[n:n + 1], queue]), [[0]], 0.2) for n in range(4)])
    got = L.seed(_t(s), _t(t), _t(queue), 1e-4, 0.2).item()
    assert got == pytest.approx(ref, rel=1e-6)


def test_cosine_and_probs():
    s, t = _rand(5, 4, seed=11), _rand(5, 4, seed=12)
    ref = np.mean([1 - np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(s, t)])
    assert L.cosine(_t(s), _t(t)).item() == pytest.approx(ref, rel=1e-9)
    p = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    ref = np.mean([-sum(p[n, c] * (s[n, c] - _logsumexp(s[n])) for c in range(4)) for n in range(5)])
    assert L.soft_ce_probs(_t(s), _t(p)).item() == pytest.approx(ref, rel=1e-9)


def test_losses_are_minimal_at_the_target():
    t = _t(_rand(6, 8, seed=13))
    for fn in (lambda s: L.soft_ce(s, t, 0.2), lambda s: L.cosine(s, t), lambda s: L.seed(s, t, t[:3], 0.01, 0.2)):
        at = fn(t.clone()).item()
        for k in range(5):
            assert fn(t + 0.3 * _t(_rand(6, 8, seed=20 + k))).item() > at


def test_queue_is_a_fifo_of_the_last_targets():
    q = L.TargetQueue(5, 2)
    assert q.negatives().shape == (0, 2)
    pushed = []
    for step, n in enumerate([2, 2, 3, 7, 1]):
        x = torch.arange(n * 2, dtype=torch.float32).view(n, 2) + 100 * step
        q.push(x)
        pushed += [tuple(r) for r in x.tolist()]
        have = sorted(tuple(r) for r in q.negatives().tolist())
        assert have == sorted(pushed[-5:]), step
    state = q.state()
    other = L.TargetQueue(5, 2)
    other.load(state)
    assert torch.equal(other.negatives(), q.negatives()) and int(other.ptr) == int(q.ptr)


def test_distill_loss_infonce_uses_batch_and_queue_then_enqueues():
    loss = L.DistillLoss("infonce", 6, temperature=0.2, queue_size=8)
    s1, t1 = _rand(4, 6, seed=30), _rand(4, 6, seed=31)
    img = torch.tensor([0, 0, 1, 1])
    val, metrics = loss(_t(s1).float(), _t(t1).float(), img)
    assert val.item() == pytest.approx(_ref_infonce(s1, t1, [[n] for n in range(4)], 0.2), rel=1e-5)
    assert metrics["negatives"] == 3
    s2, t2 = _rand(4, 6, seed=32), _rand(4, 6, seed=33)
    val, _ = loss(_t(s2).float(), _t(t2).float(), img)  # keys: this batch, then the first batch from the queue
    assert val.item() == pytest.approx(_ref_infonce(s2, np.concatenate([t2, t1]), [[n] for n in range(4)], 0.2),
                                       rel=1e-5)
    multi = L.DistillLoss("infonce", 6, queue_size=8, multi_positive=True)
    val, _ = multi(_t(s1).float(), _t(t1).float(), img)
    assert val.item() == pytest.approx(_ref_infonce(s1, t1, [[0, 1], [0, 1], [2, 3], [2, 3]], 0.2), rel=1e-5)


def test_distill_loss_seed_queue_and_evaluation_mode():
    loss = L.DistillLoss("seed", 6, tau_t=0.05, tau_s=0.2, queue_size=16)
    s, t = _rand(4, 6, seed=40), _rand(4, 6, seed=41)
    loss(_t(s).float(), _t(t).float(), torch.arange(4))
    val, _ = loss(_t(s).float(), _t(t).float(), torch.arange(4))
    assert val.item() == pytest.approx(_ref_seed(s, t, t, 0.05, 0.2), rel=1e-5)
    loss.eval()
    loss(_t(s).float(), _t(t).float(), torch.arange(4))
    assert int(loss.queue.filled) == 8  # evaluation does not enqueue


def test_target_center_is_an_ema_of_the_batch_means_and_frozen_in_eval():
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(5, 4)) + 2.0 for _ in range(3)]  # a large common direction
    c = L.TargetCenter(4, momentum=0.9).double()
    center = None
    for b in batches:
        center = b.mean(0) if center is None else 0.9 * center + 0.1 * b.mean(0)
        out = c(torch.from_numpy(b)).numpy()
        np.testing.assert_allclose(out, _unit(b - center), rtol=1e-12)
    c.eval()  # evaluation uses the centre, never moves it
    np.testing.assert_allclose(c(torch.from_numpy(batches[0])).numpy(), _unit(batches[0] - center), rtol=1e-12)
    assert set(c.state_dict()) == {"center", "started"}  # saved with the training state


def test_centring_is_off_for_class_probabilities_and_by_default():
    assert L.DistillLoss("cosine", 8).center is None
    assert L.DistillLoss("soft-ce", 8, probs=True, center=True).center is None
    assert isinstance(L.DistillLoss("cosine", 8, center=True).center, L.TargetCenter)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="infonce", dim=10, probs=True), "needs embedding targets"),
    (dict(name="nope", dim=10), "--loss 'nope'"),
    (dict(name="cosine", dim=1), "distillation needs >= 2 dims"),
    (dict(name="seed", dim=8, multi_positive=True), "--multi-positive applies to --loss infonce only"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        L.DistillLoss(**kwargs)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ConfigError, match="does not match the targets"):
        L.DistillLoss("cosine", 4)(torch.zeros(3, 4), torch.zeros(3, 5), torch.arange(3))


def _rank_main(rank: int, world: int, init: str, out: str) -> None:  # runs in a spawned process
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    s_all, t_all = torch.tensor(_rand(8, 6, seed=50), dtype=torch.float32), torch.tensor(_rand(8, 6, seed=51),
                                                                                          dtype=torch.float32)
    loss = L.DistillLoss("infonce", 6, queue_size=32, multi_positive=True)
    for step in range(2):
        s = (s_all + step)[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        val, _ = loss(s, t_all[rank * 4:(rank + 1) * 4] * (step + 1), torch.arange(8)[rank * 4:(rank + 1) * 4] // 2)
        val.backward()
    np.save(os.path.join(out, f"grad{rank}.npy"), s.grad.numpy())
    np.save(os.path.join(out, f"queue{rank}.npy"), loss.queue.negatives().numpy())
    np.save(os.path.join(out, f"loss{rank}.npy"), np.array(val.item()))
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2, join=True)
    s_all, t_all = torch.tensor(_rand(8, 6, seed=50), dtype=torch.float32), torch.tensor(_rand(8, 6, seed=51),
                                                                                          dtype=torch.float32)
    loss = L.DistillLoss("infonce", 6, queue_size=32, multi_positive=True)
    for step in range(2):
        s = (s_all + step).clone().requires_grad_(True)
        val, _ = loss(s, t_all * (step + 1), torch.arange(8) // 2)
        val.backward()
    # each rank's loss is the mean over its rows, so the global loss is the mean of the two
    ranks = [float(np.load(tmp_path / f"loss{r}.npy")) for r in range(2)]
    assert np.mean(ranks) == pytest.approx(val.item(), rel=1e-5)
    grads = np.concatenate([np.load(tmp_path / f"grad{r}.npy") for r in range(2)])
    np.testing.assert_allclose(grads / 2, s.grad.numpy(), rtol=1e-4, atol=1e-6)
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"queue{r}.npy"), loss.queue.negatives().numpy(), rtol=1e-6)
