"""Several teachers on the same views (--teacher given twice, --ensemble mean|concat) and a store
whose views are exactly another store's (--views-from)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from fkd_ssl.checkpoint import save_model
from fkd_ssl.models import Encoder, ModelSpec
from fkd_ssl.store import TargetStore
from test_teachers_pretrained import command, gen

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two small classifier teachers with different random weights."""
    d = tmp_path_factory.mktemp("teachers")
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = Encoder(ModelSpec(arch="resnet10t", stem="small", num_classes=10, input_size=32))
        with torch.no_grad():  # BN statistics that make outputs depend on the input
            model.train()
            model(torch.randn(32, 3, 32, 32))
        out.append(save_model(d / f"t{seed}" / "model", model.eval(), {"method": "test"}))
    return out


def _all(path):
    store = TargetStore.open(path, verify=True)
    ii, rr = np.repeat(np.arange(store.num_images), 2), np.tile(np.arange(2), store.num_images)
    return store, store.params_batch(ii, rr), store.targets(ii, rr)


@pytest.mark.parametrize("target, mode", [("probs", "mean"), ("feature", "mean"), ("feature", "concat")])
def test_ensemble_is_the_single_teachers_on_the_same_views(capsys, tmp_path, data_root, teachers, target, mode):
    t1, t2 = teachers
    gen(capsys, data_root, tmp_path / "a", "--teacher", t1, "--target", target)
    out = gen(capsys, data_root, tmp_path / "b", "--teacher", t2, "--target", target, "--views-from", tmp_path / "a",
              views=())
    assert f"views from {tmp_path / 'a'}: seed 0, 2 views per image" in out
    gen(capsys, data_root, tmp_path / "e", "--teacher", t1, "--teacher", t2, "--target", target, "--ensemble", mode)
    (a, pa, ya), (b, pb, yb), (e, pe, ye) = _all(tmp_path / "a"), _all(tmp_path / "b"), _all(tmp_path / "e")
    np.testing.assert_array_equal(pa, pb)  # --views-from: exactly the other store's views
    np.testing.assert_array_equal(pa, pe)  # every teacher of the ensemble saw them too
    expected = (ya + yb) / 2 if mode == "mean" else np.concatenate([ya, yb], 1) / np.sqrt(2)
    np.testing.assert_allclose(ye, expected, atol=1e-6)
    assert np.abs(ya - yb).max() > 1e-3  # the two teachers do differ
    members = e.identity.teacher["members"]
    assert [m["hash"] for m in members] == [a.identity.teacher["hash"], b.identity.teacher["hash"]]
    assert e.identity.teacher["hash"].startswith("ensemble:") and e.identity.teacher["ensemble"] == mode


def test_views_from_refuses_another_dataset_and_view_flags(capsys, tmp_path, data_root, teachers):
    gen(capsys, data_root, tmp_path / "a", "--teacher", teachers[0])
    base = ["--data-root", data_root, "--teacher", teachers[1], "--views-from", tmp_path / "a", "--device", "cpu",
            "--workers", "0"]
    for extra, needle in ((["--data", "synthetic:train=20,val=10,size=32"], "was made from another dataset"),
                          (["--data", TINY, "--crop-min", "0.5"], "sets the views: leave out --crop-min"),
                          (["--data", TINY, "--views-per-image", "3"], "sets the views")):
        code, _, err = command(capsys, "gen_targets", *base, *extra, "--out", tmp_path / "b")
        assert code == 2 and needle in err.strip().splitlines()[-1], err
        assert not (tmp_path / "b" / "header.json").exists()
