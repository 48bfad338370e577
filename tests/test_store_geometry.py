"""How a store keeps view parameters (fkd_ssl/store/geometry.py): recomputed and checked, fixed point, float32."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fkd_ssl import views as V
from fkd_ssl.errors import ConfigError, DataError
from fkd_ssl.store import StoreWriter, TargetStore, finalize, make_codec
from fkd_ssl.store import layout as L
from fkd_ssl.store.geometry import FixedGeometry, ReplayGeometry

N, R, SEED = 6, 5, 3
CFG = V.ViewConfig(size=16, photometric=True)
SIZES = [(30 + i, 40 - i) for i in range(N)]


def _params(i: int) -> np.ndarray:
    return V.sample_views(CFG, SEED, i, range(R), *SIZES[i])


def _replay_store(path, **kw) -> TargetStore:
    w = StoreWriter.create_or_resume(path, {"views": CFG.to_dict(), "seed": SEED}, num_images=N, views_per_image=R,
                                     param_dim=V.VIEW_PARAM_DIM, target_dim=4, codec=make_codec("fp16"), shard_size=4,
                                     geometry=ReplayGeometry(V.VIEW_PARAM_DIM, CFG.to_dict(), SEED), **kw)
    w.write(np.arange(N), np.stack([_params(i) for i in range(N)]), np.ones((N, R, 4), np.float32), sizes=SIZES)
    w.complete_owned()
    finalize(path)
    return TargetStore.open(path, verify=True)


def test_replay_store_recomputes_the_params_and_stores_none(tmp_path):
    s = _replay_store(tmp_path / "s")
    assert s.stored_dtype.names == ("x",) and s.manifest["geometry"]["kind"] == "replay"
    i, r = np.repeat(np.arange(N), R), np.tile(np.arange(R), N)
    params, targets = s.read(i, r)
    assert np.array_equal(params, np.concatenate([_params(k) for k in range(N)]))  # bit for bit
    assert np.array_equal(targets, np.ones((N * R, 4), np.float32))
    assert np.array_equal(s.records(i, r)[L.PARAMS_FIELD], params)


def test_views_another_sampler_draws_are_refused(tmp_path, monkeypatch):
    s = tmp_path / "s"
    _replay_store(s)
    real = V.sample_views
    monkeypatch.setattr(V, "sample_views", lambda cfg, seed, image, slots, h, w: real(cfg, seed + 1, image, slots, h, w))
    with pytest.raises(DataError, match=r"views recomputed here differ from those its teacher saw .*numpy"):
        TargetStore.open(s)
    monkeypatch.undo()
    w = StoreWriter.create_or_resume(tmp_path / "t", {}, num_images=N, views_per_image=R, param_dim=V.VIEW_PARAM_DIM,
                                     target_dim=4, codec=make_codec("fp16"),
                                     geometry=ReplayGeometry(V.VIEW_PARAM_DIM, CFG.to_dict(), SEED + 1))
    with pytest.raises(ConfigError, match="not the store's sampler's"):  # the writer checks what it is given
        w.write(np.arange(1), _params(0)[None], np.ones((1, R, 4), np.float32), sizes=SIZES[:1])


def test_a_version_1_store_still_opens_and_is_not_resumed(tmp_path):
    path = tmp_path / "v1"
    w = StoreWriter.create_or_resume(path, {"t": 1}, num_images=2, views_per_image=R, param_dim=3, target_dim=4,
                                     codec=make_codec("fp32"))
    p = np.random.default_rng(0).random((2, R, 3), dtype=np.float32)
    w.write(np.arange(2), p, np.ones((2, R, 4), np.float32))
    w.complete_owned()
    finalize(path)
    for name in (L.HEADER, L.MANIFEST):  # what version 1 wrote: no geometry
        d = json.loads((path / name).read_text())
        d.pop("geometry")
        (path / name).write_text(json.dumps({**d, "version": 1}))
    assert np.array_equal(TargetStore.open(path, verify=True).params_batch([1], [2]), p[1, 2:3])
    with pytest.raises(ConfigError, match=r"version: 1 -> 2.*overwrite"):
        StoreWriter.create_or_resume(path, {"t": 1}, num_images=2, views_per_image=R, param_dim=3, target_dim=4,
                                     codec=make_codec("fp32"))


def test_fixed_geometry_keeps_pixel_boxes_in_8_bytes():
    g = FixedGeometry(V.VIEW_PARAM_DIM)
    cfg = V.ViewConfig(photometric=False)
    for h, w in ((375, 500), (4000, 3000), (32767, 17)):
        p = V.sample_views(cfg, 0, 1, range(50), h, w)[None]
        fields, _ = g.encode(np.arange(1), p, None)
        back = g.decode(fields, None, None, None)
        assert fields["box"].dtype.itemsize == 8
        assert [V.crop_pixels(a, h, w) for a in back[0]] == [V.crop_pixels(a, h, w) for a in p[0]]
        assert np.array_equal(back[..., 4:], p[..., 4:])
    with pytest.raises(ValueError, match="crop fractions"):
        g.encode(np.arange(1), V.sample_views(CFG, 0, 1, range(50), 30, 30)[None], None)
