"""spread_views: each decoded image's K views spread over several steps, checked against its definition."""

from __future__ import annotations

import argparse

import pytest
import torch

from fkd_ssl.data.sampler import spread_views
from fkd_ssl.training_data import resolve_spread
from fkd_ssl.replay import ReplayBatch

K, B, PER_EPOCH = 4, 3, 10  # views per image, images per input batch, input batches per epoch


def _batches(epochs: int = 2, start: int = 0):
    """Input batches whose view v of image i holds the value 10 * i + v; image ids are unique per epoch step."""
    for e in range(epochs):
        for s in range(PER_EPOCH):
            if e * PER_EPOCH + s < start:
                continue
            img = torch.arange(B) + 100 * e + B * s
            views = img.view(B, 1, 1, 1, 1) * 10 + torch.arange(K).view(1, K, 1, 1, 1)
            yield ReplayBatch(views.expand(B, K, 3, 1, 1).clone(), torch.rand(B, K, 2), img,
                              torch.arange(K).repeat(B, 1), torch.zeros(B, 0))


@pytest.mark.parametrize("window", [4, 8])
def test_every_view_once_distinct_images_per_step_views_window_over_k_apart(window):
    out = list(spread_views(_batches(), window, PER_EPOCH, seed=3))
    assert len(out) == 2 * PER_EPOCH
    full = PER_EPOCH // window * window
    for e in range(2):
        group_out = out[e * PER_EPOCH:e * PER_EPOCH + full]
        step_of = {}
        for step, b in enumerate(group_out):
            assert b.views.shape == (B * K, 1, 3, 1, 1) and b.targets.shape == (B * K, 1, 2)
            ids = b.image.tolist()
            assert len(set(ids)) == len(ids)  # one view per image in a step
            assert torch.equal(b.views[:, 0, 0, 0, 0] // 10, b.image)  # the view belongs to its image
            assert torch.equal(b.views[:, 0, 0, 0, 0] % 10, b.slots[:, 0])
            for i, v in zip(ids, b.slots[:, 0].tolist()):
                step_of[(i, v)] = step
        images = {i for (i, _) in step_of}
        assert len(step_of) == len(images) * K == full * B * K  # every (image, view) exactly once
        for i in images:
            steps = [step_of[(i, v)] for v in range(K)]
            assert [(steps[v] - steps[0]) % window for v in range(K)] == [v * window // K for v in range(K)]
        tail = out[e * PER_EPOCH + full:(e + 1) * PER_EPOCH]  # the epoch's tail passes through
        assert all(b.views.shape == (B, K, 3, 1, 1) for b in tail)


def test_targets_follow_their_views():
    inputs = list(_batches(1))
    by_view = {(int(i), v): t for b in inputs for i, tv in zip(b.image, b.targets) for v, t in enumerate(tv)}
    for b in spread_views(iter(inputs), 8, PER_EPOCH):
        for i, v, t in zip(b.image.tolist(), b.slots[:, 0].tolist(), b.targets[:, 0]):
            assert torch.equal(t, by_view[(i, v)])


def test_resume_at_a_group_boundary_continues_the_same_steps():
    full = list(spread_views(_batches(), 4, PER_EPOCH, seed=1))
    for start in (4, 8, 10, 14):
        resumed = list(spread_views(_batches(start=start), 4, PER_EPOCH, start_batch=start, seed=1))
        assert len(resumed) == len(full) - start
        assert all(torch.equal(a.views, b.views) and torch.equal(a.image, b.image)
                   for a, b in zip(full[start:], resumed))


def test_window_must_be_a_multiple_of_k():
    with pytest.raises(ValueError, match="multiple of K = 4"):
        list(spread_views(_batches(1), 6, PER_EPOCH))


@pytest.mark.parametrize("k, spread, one_step, expected", [(4, None, False, 16), (1, None, False, 0), (4, None, True, 0),
                                                           (4, 8, False, 8), (4, 0, False, 0)])
def test_default_spread_is_4k_unless_the_views_must_share_a_step(k, spread, one_step, expected):
    args = argparse.Namespace(crops_per_image=k, spread_steps=spread)
    resolve_spread(args, one_step)
    assert args.spread_steps == expected


def test_student_ssl_term_refuses_spread_views(capsys):
    from fkd_ssl.cli import run_main
    from fkd_ssl.commands import distill_ssl

    with pytest.raises(SystemExit) as e:  # as the console script runs it
        run_main(distill_ssl.main, ["--ssl", "moco", "--spread-steps", "8", "--store", "nowhere"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --ssl moco needs the views of an image in one step: drop --spread-steps"
