"""Views: pure sampling, exact replay, crop-box statistics; the rank-aware batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fkd_ssl.data.sampler import EpochBatchSampler
from fkd_ssl.views import (PARAM_FIELDS, RandomViewsDataset, ViewConfig, crop_pixels, render_view, render_views,
                           sample_views)


def test_sampling_is_a_pure_function():
    cfg = ViewConfig(size=16)
    a = sample_views(cfg, 3, 10, [5], 96, 80)[0]
    assert np.array_equal(a, sample_views(cfg, 3, 10, [5], 96, 80)[0])
    assert not np.array_equal(a, sample_views(cfg, 3, 10, [6], 96, 80)[0])
    assert not np.array_equal(a, sample_views(cfg, 4, 10, [5], 96, 80)[0])
    batch = sample_views(cfg, 3, 10, [7, 5], 96, 80)
    assert np.array_equal(batch[1], a) and batch.dtype == np.float32 and batch.shape == (2, len(PARAM_FIELDS))


def test_crop_boxes_follow_the_distribution():
    cfg = ViewConfig(size=16, scale=(0.2, 1.0), photometric=False)
    p = sample_views(cfg, 0, 1, range(2000), 120, 160)
    area = p[:, 2] * p[:, 3]
    assert area.min() >= 0.2 - 0.02 and area.max() <= 1.0
    assert abs(p[:, 4].mean() - 0.5) < 0.05  # flips
    assert np.all(p[:, 5:] == 0)  # no photometric params when disabled
    for row in p[:50]:  # fractions map back to integral pixel boxes inside the image
        top, left, h, w = crop_pixels(row, 120, 160)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
        assert np.isclose(row[0] * 120, top, atol=1e-3) and np.isclose(row[2] * 120, h, atol=1e-3)


def test_replay_is_bit_identical_and_photometric_changes_pixels():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g)
    cfg = ViewConfig(size=24, jitter_p=1.0, gray_p=0.0, blur_p=1.0, solarize_p=1.0)
    p = sample_views(cfg, 0, 0, [0], 50, 70)[0]
    v1, v2 = render_view(img, p, cfg), render_view(img.clone(), p.copy(), cfg)
    assert v1.dtype == torch.uint8 and v1.shape == (3, 24, 24)
    assert torch.equal(v1, v2)
    geo = p.copy()
    geo[5:] = 0
    assert not torch.equal(v1, render_view(img, geo, cfg))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_rendering_equals_torchvision_resized_crop_and_flip(interpolation):
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(1)
    hwc = torch.randint(0, 256, (90, 130, 3), dtype=torch.uint8, generator=g)
    cfg = ViewConfig(size=33, scale=(0.05, 1.0), photometric=False, interpolation=interpolation)
    p = sample_views(cfg, 0, 0, range(12), 90, 130)
    p[0, :4], p[1, :4] = (0, 0, 1, 1), (0, 0, 33 / 90, 33 / 130)  # the whole image; a crop of the output's size
    for img in (hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()):  # as decoded; channels-first
        want = []
        for row in p:
            v = TF.resized_crop(img, *crop_pixels(row, 90, 130), [33, 33], interpolation=TF.InterpolationMode(interpolation),
                                antialias=True)
            want.append(TF.horizontal_flip(v) if row[4] > 0.5 else v)
        got = render_views(img, p, cfg)
        assert got.is_contiguous() and torch.equal(got, torch.stack(want))
        assert torch.equal(render_view(img, p[3], cfg), want[3])


def test_random_views_dataset_new_views_each_epoch(data_root):
    from conftest import TINY
    from fkd_ssl.data import build_dataset

    ds = RandomViewsDataset(build_dataset(TINY, "train", data_root), ViewConfig(size=16), seed=0, n_views=2)
    item = ds[(3, 0)]
    assert item.views.shape == (2, 3, 16, 16) and item.image == 3 and item.label == ds.base.targets[3]
    assert torch.equal(item.views, ds[(3, 0)].views) and not torch.equal(item.views, ds[(3, 1)].views)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_ranks_partition_the_global_batches(world):
    n, bs, epochs = 53, 4, 3
    single = list(EpochBatchSampler(range(n), bs * world, epochs, seed=1))
    per_rank = [list(EpochBatchSampler(range(n), bs, epochs, seed=1, rank=r, world=world)) for r in range(world)]
    assert all(len(b) == len(single) for b in per_rank)
    for step, global_batch in enumerate(single):
        assert sum((per_rank[r][step] for r in range(world)), []) == global_batch
    seen = [i for b in single[: len(single) // epochs] for i, e in b]
    assert len(set(seen)) == len(seen)  # no repeats within an epoch


def test_sampler_resume_yields_the_remaining_batches():
    full = list(EpochBatchSampler(range(30), 4, 3, seed=2))
    spe = EpochBatchSampler(range(30), 4, 3, seed=2).steps_per_epoch
    resumed = list(EpochBatchSampler(range(30), 4, 3, seed=2, start_epoch=1, start_batch=3))
    assert resumed == full[spe + 3:]
    with pytest.raises(ValueError, match="lower --batch-size"):
        EpochBatchSampler(range(3), 4, 1)
