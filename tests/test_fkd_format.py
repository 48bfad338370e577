"""Published FKD soft labels (fkd_ssl.interop.fkd_layout, ``python -m fkd_ssl.store import-fkd / export-fkd``).

Every fixture is made here: a few tiny PNG images in an image-folder tree, and an FKD soft-label
folder written the way the reference generator writes one (``torch.save`` of
``[coords (R,4), flips (R,), labels (R,2,k)]`` numpy arrays per image, named
``<split>/<class>/<name up to its first dot>.tar``), with crop boxes drawn like torchvision's
RandomResizedCrop and stored as fractions.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fkd_ssl.cli import run_main
from fkd_ssl.data import build_dataset, pil_to_uint8_tensor
from fkd_ssl.errors import ConfigError, DataError
from fkd_ssl.store import StoreWriter, TargetStore, finalize, make_codec
from fkd_ssl.commands.store import main as store_main
from fkd_ssl.interop.fkd_layout import (EXPORT_MARKER, export_fkd, import_fkd, label_relpath, label_relpaths,
                                      load_label_file)
from fkd_ssl.views import VIEW_PARAM_DIM, ViewConfig, crop_pixels, render_view

C, R, K = 12, 6, 3
# image (relative to train/) -> (height, width); "b.v2.png" checks the name is cut at its first dot
IMAGES = {"cat/a.png": (40, 40), "cat/b.v2.png": (53, 37), "dog/c.png": (31, 45), "dog/d.png": (40, 40)}


def _tree(root: Path) -> Path:
    """An image folder ``root/data/train/<class>/<image>`` of small random PNGs; returns ``root/data``."""
    rng = np.random.default_rng(0)
    for rel, (h, w) in IMAGES.items():
        p = root / "data" / "train" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    return root / "data"


def _fkd_folder(root: Path, data: Path, fp16: bool = False, seed: int = 0) -> Path:
    """Soft labels in the published layout for every image of ``data/train`` (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    for rel, (h, w) in IMAGES.items():
        coords = np.zeros((R, 4), dtype=np.float32)
        for r in range(R):  # RandomResizedCrop-like integer box, kept as fractions of the image
            area = h * w * float(torch.empty(1).uniform_(0.08, 0.936, generator=g))
            ratio = float(torch.empty(1).uniform_(3 / 4, 4 / 3, generator=g))
            bw, bh = min(w, max(1, round((area * ratio) ** 0.5))), min(h, max(1, round((area / ratio) ** 0.5)))
            top = int(torch.randint(0, h - bh + 1, (1,), generator=g))
            left = int(torch.randint(0, w - bw + 1, (1,), generator=g))
            coords[r] = (top / h, left / w, bh / h, bw / w)
        if (h, w) == (40, 40):  # a box whose corners fall on half pixels: 12.5 + 12.5 -> rows 12..25
            coords[0] = (0.3125, 0.3125, 0.3125, 0.3125)
        flips = (torch.rand(R, generator=g) < 0.5).numpy()
        probs = torch.softmax(torch.randn(R, C, generator=g) * 2, dim=1)
        order = torch.argsort(probs, dim=1, descending=True)[:, :K]
        labels = np.stack([order.float().numpy(), torch.gather(probs, 1, order).numpy()], axis=1)  # (R, 2, K)
        if fp16:
            coords, labels = np.float16(coords), np.float16(labels)
        out = root / "fkd" / "train" / (rel.split(".")[0] + ".tar")
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save([coords, flips, labels], out)
    return root / "fkd"


def _read(path: Path) -> list:
    """A label file as the reference reader gets it (``torch.load``), here with ``weights_only=True``
    and numpy's array types allowed; nothing in this suite unpickles otherwise."""
    from fkd_ssl.interop.fkd_layout import numpy_safe_globals

    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(path, weights_only=True)


def _import(fkd: Path, data: Path, out: Path, *extra: str) -> int:
    return store_main(["import-fkd", str(fkd), "--data", f"imagefolder:{data}", "--out", str(out), "--workers", "0",
                       "--num-classes", str(C), "--view-size", "16", *extra])


def _export(store: Path, data: Path, out: Path, *extra: str) -> int:
    return store_main(["export-fkd", str(store), "--data", f"imagefolder:{data}", "--out", str(out), *extra])


def _plain_box(coords_row, height: int, width: int) -> tuple[int, int, int, int]:
    """The pixels the reference code crops, computed plainly: PIL rounds the float box corners."""
    y, x, hh, ww = (float(v) for v in coords_row)
    top, left = y * height, x * width
    return round(top), round(left), round(top + hh * height), round(left + ww * width)


def _records(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard-*"))}


@pytest.fixture()
def data(tmp_path) -> Path:
    return _tree(tmp_path)


# ----------------------------------------------------------------------------- naming


def test_label_names_mirror_the_image_tree():
    assert label_relpath("n01440764/n01440764_10026.JPEG", "train") == "train/n01440764/n01440764_10026.tar"
    assert label_relpath("cat/b.v2.png", "val") == "val/cat/b.tar"
    with pytest.raises(DataError, match="share the FKD label file train/c/x.tar"):
        label_relpaths(["c/x.jpg", "c/x.png"], "train")


def test_older_label_types_read_as_top_1(tmp_path):
    """``smoothing`` files hold (R, 2) [top-1 index, value]; ``hard`` files (R,) int64 indices."""
    f = tmp_path / "x.tar"
    torch.save([np.zeros((R, 4), np.float32), np.zeros(R, bool), np.tile(np.float32([[7, 0.5]]), (R, 1))], f)
    lab = load_label_file(f)
    assert (lab.layout, lab.k, lab.indices[0, 0], lab.values[0, 0]) == ("smoothing", 1, 7, 0.5)
    torch.save([np.zeros((R, 4), np.float32), np.zeros(R, bool), np.full(R, 3, np.int64)], f)
    lab = load_label_file(f)
    assert (lab.layout, lab.k, lab.indices[0, 0], lab.values[0, 0]) == ("hard", 1, 3, 1.0)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("fp16", [False, True])
def test_import_replays_the_crops_and_labels_fkd_takes(tmp_path, data, fp16):
    fkd = _fkd_folder(tmp_path, data, fp16=fp16)
    out = tmp_path / "store"
    assert _import(fkd, data, out) == 0
    store = TargetStore.open(out, verify=True)
    ds = build_dataset(f"imagefolder:{data}", "train")
    shape = (store.num_images, store.views_per_image, store.target_dim, store.param_dim)
    assert shape == (len(IMAGES), R, C, VIEW_PARAM_DIM)
    assert store.codec.name == "topk" and store.codec.config == {"k": K, "num_classes": C, "mode": "smooth"}
    ident = store.identity
    assert ident.dataset["fingerprint"] == ds.fingerprint() and ident.extra == {"geometry": "fkd-pil-box"}
    assert ident.teacher["imported_from"] == "fkd" and ident.teacher["source"] == str(fkd.resolve())
    assert ident.teacher["label_type"] == f"marginal_smoothing_k{K}"
    assert ident.teacher["file_dtype"] == ("float16" if fp16 else "float32")
    cfg = ViewConfig.from_dict(ident.views)
    assert not cfg.photometric and cfg.interpolation == "bicubic"

    half_pixel_cases = 0
    for i in range(len(ds)):
        coords, flips, labels = _read(fkd / "train" / (ds.samples[i][0].split(".")[0] + ".tar"))
        params, targets = store.read(np.full(R, i), np.arange(R))
        pil = ds.load(i)
        img = pil_to_uint8_tensor(pil)
        H, W = img.shape[1:]
        for r in range(R):
            top, left, bottom, right = _plain_box(coords[r], H, W)
            # the plain computation is what PIL does with FKD's float box
            y, x, hh, ww = (float(v) for v in coords[r])
            fkd_crop = np.asarray(pil.crop((x * W, y * H, x * W + ww * W, y * H + hh * H)))
            assert np.array_equal(fkd_crop, np.asarray(pil)[top:bottom, left:right])
            half_pixel_cases += (bottom - top) != round(hh * H)
            # our replay takes exactly those pixels, then flips like FKD
            assert crop_pixels(params[r], H, W) == (top, left, bottom - top, right - left)
            assert params[r, 4] == float(flips[r]) and not params[r, 5:].any()
            want = TF.resized_crop(img, top, left, bottom - top, right - left, [16, 16],
                                   interpolation=InterpolationMode.BICUBIC, antialias=True)
            if flips[r]:
                want = TF.horizontal_flip(want)
            assert torch.equal(render_view(img, params[r], cfg), want)
            # FKD's marginal smoothing, computed plainly in float64
            idx, val = labels[r, 0].astype(np.int64), labels[r, 1].astype(np.float64)
            full = np.full(C, (1.0 - val.sum()) / (C - K))
            full[idx] = val
            np.testing.assert_allclose(targets[r], full, rtol=0, atol=1e-6 if fp16 else 2e-3)
            if fp16:  # float16 values are stored exactly
                assert np.array_equal(targets[r][idx], val.astype(np.float32))
    assert half_pixel_cases >= 1  # a box where rounding h * H alone would be off by one


def test_rerun_leaves_a_finished_store_alone_and_refuses_another(tmp_path, data, capsys):
    fkd = _fkd_folder(tmp_path, data)
    out = tmp_path / "store"
    assert _import(fkd, data, out) == 0
    before = _records(out) | {"manifest.json": (out / "manifest.json").read_bytes()}
    assert _import(fkd, data, out) == 0
    assert "already complete" in capsys.readouterr().out
    assert _records(out) | {"manifest.json": (out / "manifest.json").read_bytes()} == before
    with pytest.raises(ConfigError, match=r"other settings .*codec\.params\.mode: 'smooth' -> 'renorm'"):
        _import(fkd, data, out, "--topk-mode", "renorm")
    assert _records(out) | {"manifest.json": (out / "manifest.json").read_bytes()} == before
    assert _import(fkd, data, out, "--topk-mode", "renorm", "--overwrite") == 0
    assert TargetStore.open(out).codec.mode == "renorm"


def test_interrupted_import_resumes_to_the_same_bytes(tmp_path, data):
    fkd = _fkd_folder(tmp_path, data)
    ref, out = tmp_path / "ref", tmp_path / "store"
    assert _import(fkd, data, ref, "--shard-size", "2") == 0
    # a run that died after the first write: only the first shard's images are done
    from fkd_ssl.interop import fkd_layout as F

    calls = {"n": 0}
    real = StoreWriter.write_encoded

    def dying_write(self, *a, **kw):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *a, **kw)

    old_chunk, F.IMPORT_CHUNK = F.IMPORT_CHUNK, 2
    try:
        StoreWriter.write_encoded = dying_write
        with pytest.raises(KeyboardInterrupt):
            _import(fkd, data, out, "--shard-size", "2")
    finally:
        StoreWriter.write_encoded = real
    with pytest.raises(DataError, match="not finished"):
        TargetStore.open(out)
    try:
        assert _import(fkd, data, out, "--shard-size", "2") == 0
    finally:
        F.IMPORT_CHUNK = old_chunk
    assert _records(out) == _records(ref)


# ----------------------------------------------------------------------------- refusals


class _Payload:
    """Unpickling this would create a file: a stand-in for code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path, data):
    fkd = _fkd_folder(tmp_path, data)
    marker = tmp_path / "PWNED"
    victim = fkd / "train" / "dog" / "c.tar"
    coords, flips, _ = _read(victim)
    torch.save([coords, flips, _Payload(marker)], victim)
    # the fixture really asks for code to run (read without unpickling: the opcodes of its data.pkl)
    with zipfile.ZipFile(victim) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = [arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"]
    assert any(g.endswith(" makedirs") for g in globals_)
    with pytest.raises(DataError, match=r"c\.tar refused: it needs (os|posix)\.makedirs"):
        load_label_file(victim)
    with pytest.raises(DataError, match="refused"):
        _import(fkd, data, tmp_path / "store")
    assert not marker.exists()


def test_a_tree_that_does_not_match_the_images_is_refused(tmp_path, data):
    fkd = _fkd_folder(tmp_path, data)
    (fkd / "train" / "dog" / "d.tar").rename(fkd / "train" / "dog" / "zz.tar")
    with pytest.raises(DataError) as e:
        _import(fkd, data, tmp_path / "store")
    msg = str(e.value)
    assert "1 images have no label file (first: dog/d.png" in msg and "d.tar" in msg
    assert "1 label files have no image" in msg and "zz.tar" in msg
    assert not (tmp_path / "store" / "header.json").exists()


def test_cli_errors_are_one_line(tmp_path, data, capsys):
    fkd = _fkd_folder(tmp_path, data)
    (fkd / "train" / "cat" / "a.tar").unlink()
    argv = ["import-fkd", str(fkd), "--data", f"imagefolder:{data}", "--out", str(tmp_path / "s"), "--workers", "0"]
    with pytest.raises(SystemExit) as e:
        run_main(store_main, argv)  # what ``python -m fkd_ssl.store`` runs
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: FKD folder") and "cat/a.png" in err[-1] and "Traceback" not in "".join(err)
    with pytest.raises(SystemExit) as e:
        run_main(store_main, ["export-fkd", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: target store")


def test_bad_files_name_the_file(tmp_path, data):
    fkd = _fkd_folder(tmp_path, data)
    f = fkd / "train" / "dog" / "c.tar"
    f.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match=r"c\.tar cannot be read"):
        _import(fkd, data, tmp_path / "s1")
    torch.save({"coords": np.zeros((R, 4), np.float32)}, f)
    with pytest.raises(DataError, match=r"c\.tar is not in the FKD layout"):
        load_label_file(f)
    torch.save([np.zeros((R + 1, 4), np.float32), np.zeros(R + 1, bool), np.zeros((R + 1, 2, K), np.float32)], f)
    with pytest.raises(DataError, match=r"c\.tar holds 7 crops.*first file holds 6"):
        _import(fkd, data, tmp_path / "s2")
    labels = np.zeros((R, 2, K), np.float32)
    labels[:, 0] = [0, 1, C]  # class index C is out of range
    torch.save([np.zeros((R, 4), np.float32), np.zeros(R, bool), labels], f)
    with pytest.raises(DataError, match=rf"c\.tar has class index {C} outside"):
        _import(fkd, data, tmp_path / "s3")


# ----------------------------------------------------------------------------- export


def test_import_export_import_round_trip(tmp_path, data):
    fkd = _fkd_folder(tmp_path, data)
    a, b, exported = tmp_path / "a", tmp_path / "b", tmp_path / "exported"
    assert _import(fkd, data, a) == 0
    assert _export(a, data, exported) == 0
    ds = build_dataset(f"imagefolder:{data}", "train")
    for i, (rel, _) in enumerate(ds.samples):
        name = "train/" + rel.split(".")[0] + ".tar"
        c0, f0, l0 = _read(fkd / name)
        c1, f1, l1 = _read(exported / name)
        assert [type(v) for v in (c1, f1, l1)] == [np.ndarray] * 3
        assert (c1.dtype, f1.dtype, l1.dtype, l1.shape) == (np.float32, np.bool_, np.float32, (R, 2, K))
        H, W = IMAGES[rel]
        assert [_plain_box(c1[r], H, W) for r in range(R)] == [_plain_box(c0[r], H, W) for r in range(R)]
        drawn = slice(1, R) if (H, W) == (40, 40) else slice(0, R)  # crop 0 of 40x40 images is on half pixels
        np.testing.assert_allclose(c1[drawn], c0[drawn], rtol=0, atol=2 ** -16)  # 15-bit fixed point in the store
        assert np.array_equal(f1, f0) and np.array_equal(l1[:, 0], l0[:, 0])
        np.testing.assert_allclose(l1[:, 1], l0[:, 1], rtol=2 ** -10, atol=0)
        assert (l1[:, 1] <= l0[:, 1]).all()  # rounded toward zero, never more mass than the teacher gave
    marker = (exported / EXPORT_MARKER).read_text()
    assert '"complete": true' in marker and f"marginal_smoothing_k{K}" in marker
    assert _import(exported, data, b) == 0
    assert _records(b) == _records(a)  # the same views and labels, byte for byte
    ta, tb = TargetStore.open(a).identity.to_dict(), TargetStore.open(b).identity.to_dict()
    assert {k: v for k, v in ta.items() if k != "teacher"} == {k: v for k, v in tb.items() if k != "teacher"}

    # a finished export is left alone; another one into the same folder is refused
    before = {p: p.read_bytes() for p in exported.rglob("*.tar")}
    assert _export(a, data, exported) == 0
    assert {p: p.read_bytes() for p in exported.rglob("*.tar")} == before
    with pytest.raises(ConfigError, match="another FKD export"):
        _export(a, data, exported, "--fp16")
    assert _export(a, data, exported, "--fp16", "--overwrite") == 0
    c16, _, l16 = _read(exported / "train/cat/a.tar")
    assert c16.dtype == np.float16 and l16.dtype == np.float16
    assert _import(exported, data, tmp_path / "c") == 0
    assert _records(tmp_path / "c") == _records(a)  # float16 files hold the same crops and values here


def test_export_of_a_full_probability_store_takes_the_top_k(tmp_path, data):
    ds = build_dataset(f"imagefolder:{data}", "train")
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(C), size=(len(ds), R)).astype(np.float32)
    probs[0, 0, [2, 5]] = probs[0, 0].max() + 0.01  # a tie: the lower class index comes first
    probs[0, 0] /= probs[0, 0].sum()
    params = np.zeros((len(ds), R, VIEW_PARAM_DIM), dtype=np.float32)
    params[:, :, 2:4] = 0.5
    params[:, :, 4] = rng.random((len(ds), R)) < 0.5
    identity = {"teacher": {"target": "probs"}, "dataset": {"fingerprint": ds.fingerprint(), "split": "train"}}
    store = tmp_path / "probs"
    w = StoreWriter.create_or_resume(store, identity, num_images=len(ds), views_per_image=R,
                                     param_dim=VIEW_PARAM_DIM, target_dim=C, codec=make_codec("fp32"))
    w.write(np.arange(len(ds)), params, probs)
    w.complete_owned()
    finalize(store)
    out = tmp_path / "labels"
    assert _export(store, data, out, "--topk", "4") == 0
    lab = load_label_file(out / "train/cat/a.tar")
    want = np.argsort(-probs[0], axis=1, kind="stable")[:, :4]
    assert np.array_equal(lab.indices, want) and lab.indices[0, 0] == 2 and lab.indices[0, 1] == 5
    np.testing.assert_array_equal(lab.values, np.take_along_axis(probs[0], want, axis=1))
    assert np.array_equal(lab.coords, params[0, :, :4]) and np.array_equal(lab.flips, params[0, :, 4] > 0.5)

    # photometric views cannot be written in FKD's layout; feature stores are not soft labels
    photo = tmp_path / "photo"
    params[1, 2, 6] = 1.2  # brightness
    w = StoreWriter.create_or_resume(photo, identity, num_images=len(ds), views_per_image=R,
                                     param_dim=VIEW_PARAM_DIM, target_dim=C, codec=make_codec("fp32"))
    w.write(np.arange(len(ds)), params, probs)
    w.complete_owned()
    finalize(photo)
    with pytest.raises(ConfigError, match="photometric views"):
        export_fkd(photo, ds, tmp_path / "x", show_progress=False)
    with pytest.raises(ConfigError, match="another dataset"):
        export_fkd(store, _other(tmp_path), tmp_path / "y", show_progress=False)


def _other(tmp_path: Path):
    """Another image folder (one black image)."""
    p = tmp_path / "other" / "train" / "k"
    p.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p / "x.png")
    return build_dataset(f"imagefolder:{tmp_path / 'other'}", "train")


def test_import_of_a_folder_one_level_up(tmp_path, data):
    """The generator's --save_path holds one more level (the dataset folder's name) above train/."""
    fkd = _fkd_folder(tmp_path, data)
    up = tmp_path / "save_path"
    up.mkdir()
    fkd.rename(up / "imagenet")
    r = import_fkd(up, build_dataset(f"imagefolder:{data}", "train"), tmp_path / "s", num_classes=C,
                   show_progress=False, log=lambda s: None)
    assert r.written == len(IMAGES) and not r.already_complete
