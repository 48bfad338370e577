"""Evaluators: kNN against a plain-torch reference, the probe against scikit-learn, the feature
cache (reuse, resume, untrusted partial files, DDP gather), the scripts and their errors."""

from __future__ import annotations

import json
import math
import os
import runpy
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fkd_ssl.checkpoint import save_model
from fkd_ssl.cli import run_main
from fkd_ssl.data import build_dataset
from fkd_ssl.dist import DistContext
from fkd_ssl.errors import ConfigError
from fkd_ssl.evaluation import features as feat_mod
from fkd_ssl.evaluation.features import cache_key, extract_features, load_cached, resolve_source
from fkd_ssl.evaluation.knn import knn_evaluate, knn_search, ranked_classes, vote
from fkd_ssl.evaluation.probe import fast_linear_probe, fit_logistic, standardizer, stratified_holdout
from fkd_ssl.evaluation.results import append_rows, latest, load_rows, render_markdown
from fkd_ssl.models import IMAGENET_MEAN, IMAGENET_STD, Encoder, ModelSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = "synthetic:train=60,val=30,size=32"
CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    build_dataset(SPEC, "train", root=root, verbose=False)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    enc = Encoder(ModelSpec(arch="test_resnet", stem="small", input_size=32, head="moco", head_hidden=32, head_out=16))
    return save_model(tmp_path_factory.mktemp("ckpt") / "model", enc, {"method": "test"})


def _script(name: str):
    return runpy.run_path(str(ROOT / "eval" / f"{name}.py"), run_name=f"eval_{name}")["main"]


def _exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    return int(e.value.code)


# ----------------------------------------------------------------------------- kNN


def _clustered(n: int, dim: int, classes: int, seed: int, spread: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    return (centers[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int64)


def _reference_rank(bank, bank_y, queries, k, classes, mode, temperature):
    """Plain torch + Python: float64 cosine top-k, then per-query voting and ranking."""
    b = torch.nn.functional.normalize(torch.tensor(bank, dtype=torch.float64), dim=1)
    q = torch.nn.functional.normalize(torch.tensor(queries, dtype=torch.float64), dim=1)
    top = torch.topk(q @ b.T, k, dim=1)
    ranks = []
    for sims, idx in zip(top.values.tolist(), top.indices.tolist()):
        if mode == "weighted":
            score = [0.0] * classes
            for s, j in zip(sims, idx):
                score[bank_y[j]] += math.exp(s / temperature)
            key = [(-score[c], c) for c in range(classes)]
        else:
            count, best = [0] * classes, [-math.inf] * classes
            for s, j in zip(sims, idx):
                count[bank_y[j]] += 1
                best[bank_y[j]] = max(best[bank_y[j]], s)
            key = [(-count[c], -best[c], c) for c in range(classes)]
        ranks.append([c for _, c in sorted(zip(key, range(classes)))][:5])
    return np.array(ranks), top.indices.numpy()


def test_knn_matches_plain_torch_reference():
    classes = 7
    bank, bank_y = _clustered(700, 24, classes, seed=1)
    queries, qy = _clustered(160, 24, classes, seed=2)
    ks, majority = [1, 5, 20], [1, 4, 10]
    # small chunks and bank shards exercise the chunked search and the top-k merge
    results = knn_evaluate(bank, bank_y, queries, qy, classes, ks=ks, majority_ks=majority, query_chunk=37,
                           bank_chunk=128, use_gpu=False)
    assert [(r.vote, r.k) for r in results] == [("weighted", k) for k in ks] + [("majority", k) for k in majority]
    for r in results:
        ranks, _ = _reference_rank(bank, bank_y, queries, r.k, classes, r.vote, 0.07)
        assert np.array_equal(r.predictions, ranks[:, 0]), (r.vote, r.k)
        assert r.top1 == pytest.approx(100 * np.mean(ranks[:, 0] == qy))
        assert r.top5 == pytest.approx(100 * np.mean((ranks == qy[:, None]).any(1)))
    accs = [r.top1 for r in results]
    assert 20 < min(accs) and max(accs) < 99  # a non-trivial problem, so the comparison means something
    _, ref_idx = _reference_rank(bank, bank_y, queries, 20, classes, "weighted", 0.07)
    sims, idx = knn_search(bank, queries, 20, query_chunk=50, bank_chunk=64, use_gpu=False)
    assert np.array_equal(idx, ref_idx)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_knn_reads_float16_memmaps(tmp_path):
    bank, bank_y = _clustered(300, 16, 5, seed=3)
    queries, _ = _clustered(40, 16, 5, seed=4)
    np.save(tmp_path / "bank.npy", bank.astype(np.float16))
    mm = np.load(tmp_path / "bank.npy", mmap_mode="r")
    s1, i1 = knn_search(mm, queries.astype(np.float16), 10, use_gpu=False)
    s2, i2 = knn_search(bank.astype(np.float16).astype(np.float32), queries.astype(np.float16).astype(np.float32), 10,
                        use_gpu=False)
    assert np.array_equal(i1, i2) and np.allclose(s1, s2)


def test_vote_rules_by_hand():
    labels, sims = torch.tensor([[0, 1, 1]]), torch.tensor([[0.9, 0.5, 0.4]])
    # weighted: exp(0.9/0.07) beats exp(0.5/0.07) + exp(0.4/0.07); majority: two votes beat one
    assert ranked_classes(vote(labels, sims, 4, "weighted"), 4).tolist() == [[0, 1, 2, 3]]
    assert ranked_classes(vote(labels, sims, 4, "majority"), 4).tolist() == [[1, 0, 2, 3]]
    # a tied count goes to the class of the nearer neighbour; empty classes rank by index
    tied = vote(torch.tensor([[2, 1]]), torch.tensor([[0.3, 0.8]]), 4, "majority")
    assert ranked_classes(tied, 4).tolist() == [[1, 2, 0, 3]]
    s = vote(torch.tensor([[3]]), torch.tensor([[0.2]]), 4, "weighted")
    assert s[0, 3].item() == pytest.approx(math.exp(0.2 / 0.07))


def test_knn_rejects_bad_k():
    bank, y = _clustered(10, 4, 2, seed=0)
    with pytest.raises(ConfigError, match="--k"):
        knn_evaluate(bank, y, bank, y, 2, ks=[11], majority_ks=[], use_gpu=False)


# ----------------------------------------------------------------------------- linear probe


def test_logistic_fit_matches_sklearn():
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    x, y = _clustered(300, 12, 4, seed=5, spread=2.5)
    xt = torch.tensor(x, dtype=torch.float64)
    mean, std = standardizer(xt)
    z = ((xt - mean) / std).numpy()
    wd = 1e-2
    ours = fit_logistic(xt, torch.tensor(y), 4, wd, max_iter=1000, tol=1e-10)
    ref = sklearn_lm.LogisticRegression(C=1.0 / (wd * len(y)), tol=1e-12, max_iter=10000).fit(z, y)
    assert np.allclose(ours.weight.numpy(), ref.coef_, atol=2e-4)
    # the bias is free (unpenalised), so only its differences between classes are identified
    b = ours.bias.numpy()
    assert np.allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-4)
    assert np.array_equal(ours.logits(xt).argmax(1).numpy(), ref.predict(z))


def test_fast_probe_learns_signal_and_not_noise():
    x, y = _clustered(600, 20, 5, seed=6, spread=2.0)
    vx, vy = _clustered(200, 20, 5, seed=7, spread=2.0)
    res = fast_linear_probe(x, y, vx, vy, 5, wds=(1e-4, 1e-2, 1.0))
    assert res.top1 > 85 and res.top5 == 100.0
    assert [s["wd"] for s in res.sweep] == [1.0, 1e-2, 1e-4] and res.wd in (1e-4, 1e-2, 1.0)
    shuffled = np.random.default_rng(0).permutation(y)
    noise = fast_linear_probe(x, shuffled, vx, vy, 5, wds=(1e-4, 1e-2, 1.0))
    assert noise.top1 < 45  # chance is 20 %


def test_stratified_holdout():
    y = np.repeat(np.arange(4), [50, 20, 10, 1])
    fit, hold = stratified_holdout(y, 0.1, seed=3)
    assert len(np.intersect1d(fit, hold)) == 0 and len(fit) + len(hold) == len(y)
    assert [int((y[hold] == c).sum()) for c in range(4)] == [5, 2, 1, 0]
    assert np.array_equal(hold, stratified_holdout(y, 0.1, seed=3)[1])
    assert not np.array_equal(hold, stratified_holdout(y, 0.1, seed=4)[1])


# ----------------------------------------------------------------------------- features and cache


def test_features_match_a_direct_forward(data_root, tiny_ckpt, tmp_path):
    ds = build_dataset(SPEC, "val", root=data_root, verbose=False)
    src = resolve_source(str(tiny_ckpt))
    fs = extract_features(src, ds, CPU, batch_size=8, workers=0, cache_dir=tmp_path, dtype="float32", progress=False)
    assert fs.features.shape == (30, src.feature_dim) and not fs.cached
    assert np.array_equal(fs.labels, ds.targets)
    enc = Encoder(src.encoder.spec)
    enc.load_state_dict(src.encoder.state_dict())
    from torchvision.transforms import functional as TF

    imgs = []
    for i in range(len(ds)):  # resize 32/0.875 = 37, centre crop 32, normalise: written out by hand
        img = TF.center_crop(TF.resize(ds.load(i), 37, interpolation=TF.InterpolationMode.BILINEAR), 32)
        imgs.append(TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        ref = enc.eval().features(torch.stack(imgs)).numpy()
    assert np.allclose(fs.features, ref, atol=1e-4)
    head = resolve_source(str(tiny_ckpt), output="head")
    hs = extract_features(head, ds, CPU, batch_size=64, workers=0, cache_dir=None, progress=False)
    with torch.no_grad():
        ref_head = enc.project(torch.stack(imgs)).numpy()
    assert hs.features.shape == (30, 16) and np.allclose(hs.features, ref_head, rtol=2e-3, atol=1e-3)  # float16


def test_pixel_features_are_resized_normalised_pixels(data_root):
    ds = build_dataset(SPEC, "val", root=data_root, verbose=False)
    src = resolve_source("pixels:16")
    fs = extract_features(src, ds, CPU, batch_size=7, workers=0, cache_dir=None, dtype="float32", progress=False)
    img = ds.load(3).resize((16, 16), Image.BILINEAR)
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert fs.features.shape == (30, 768)
    assert np.allclose(fs.features[3], arr.transpose(2, 0, 1).reshape(-1), atol=1e-5)


def test_cache_is_reused_resumed_and_never_trusted_half_written(data_root, tmp_path):
    ds = build_dataset(SPEC, "train", root=data_root, verbose=False)
    calls = []

    def counting(src, fail_after=None):
        real = src.embed

        def embed(x):
            if fail_after is not None and len(calls) >= fail_after:
                raise KeyboardInterrupt("killed")
            calls.append(len(x))
            return real(x)
        src.embed = embed
        return src

    kw = dict(batch_size=8, workers=0, cache_dir=tmp_path, progress=False, flush_every=1)
    full = extract_features(resolve_source("pixels:8"), ds, CPU, **kw)
    reference = np.array(full.features)
    key, _ = cache_key(resolve_source("pixels:8"), ds, "float16")
    folder = tmp_path / key
    assert (folder / "manifest.json").is_file() and not (folder / "filled.npy").exists()

    again = extract_features(counting(resolve_source("pixels:8")), ds, CPU, **kw)
    assert again.cached and calls == [] and np.array_equal(again.features, reference)

    # a killed extraction: no manifest, so nothing is trusted; the rerun does only the rest
    (folder / "manifest.json").unlink()
    (folder / "features.npy").unlink()
    with pytest.raises(KeyboardInterrupt):
        extract_features(counting(resolve_source("pixels:8"), fail_after=3), ds, CPU, **kw)
    assert load_cached(folder, key) is None and np.load(folder / "filled.npy").sum() == 24
    calls.clear()
    resumed = extract_features(counting(resolve_source("pixels:8")), ds, CPU, **kw)
    assert sum(calls) == 60 - 24 and not resumed.cached
    assert np.array_equal(resumed.features, reference)

    # a truncated feature file behind a manifest is re-extracted, not read
    with open(folder / "features.npy", "r+b") as f:
        f.truncate(200)
    calls.clear()
    redone = extract_features(counting(resolve_source("pixels:8")), ds, CPU, **kw)
    assert sum(calls) == 60 and np.array_equal(redone.features, reference)


def test_cache_key_names_model_data_transform_and_dtype(data_root, tiny_ckpt):
    train = build_dataset(SPEC, "train", root=data_root, verbose=False)
    val = build_dataset(SPEC, "val", root=data_root, verbose=False)
    base = cache_key(resolve_source(str(tiny_ckpt)), train, "float16")[0]
    assert base == cache_key(resolve_source(str(tiny_ckpt)), train, "float16")[0]
    others = {
        cache_key(resolve_source(str(tiny_ckpt)), val, "float16")[0],
        cache_key(resolve_source(str(tiny_ckpt)), train, "float32")[0],
        cache_key(resolve_source(str(tiny_ckpt), input_size=24), train, "float16")[0],
        cache_key(resolve_source(str(tiny_ckpt), output="head"), train, "float16")[0],
        cache_key(resolve_source("random:test_resnet", stem="small", input_size=32), train, "float16")[0],
        cache_key(resolve_source("random:test_resnet", stem="small", input_size=32, seed=1), train, "float16")[0],
    }
    assert base not in others and len(others) == 6


def test_source_errors(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="--stem"):
        resolve_source(str(tiny_ckpt), stem="small")
    with pytest.raises(ConfigError, match="projection head"):
        resolve_source("random:test_resnet", output="head")
    with pytest.raises(ConfigError, match="unknown timm model"):
        resolve_source("random:not_a_model")
    assert resolve_source("random:test_resnet").identity == resolve_source("random:test_resnet").identity


def _ddp_worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from fkd_ssl import dist

    ctx = dist.setup("cpu")
    try:
        ds = build_dataset("synthetic:train=20,val=25,size=32", "val", root=root, verbose=False)
        # batch 4 over 25 images: ranks get 13 and 12 images, the last step is uneven
        fs = extract_features(resolve_source("pixels:8"), ds, ctx, batch_size=4, workers=0, cache_dir=Path(out) / "cache",
                              progress=False)
        assert (fs is not None) == (rank == 0)
        if fs is not None:
            np.save(Path(out) / "ddp.npy", np.asarray(fs.features))
    finally:
        dist.cleanup()


def test_ddp_extraction_gathers_rows_by_index(tmp_path):
    ds = build_dataset("synthetic:train=20,val=25,size=32", "val", root=tmp_path, verbose=False)
    single = extract_features(resolve_source("pixels:8"), ds, CPU, batch_size=5, workers=0, cache_dir=None, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers start at once, with everything already imported (spawn would re-import torch)
    torch.multiprocessing.start_processes(_ddp_worker, args=(port, str(tmp_path), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    assert np.array_equal(np.load(tmp_path / "ddp.npy"), single.features)


# ----------------------------------------------------------------------------- scripts and results


def test_scripts_end_to_end(data_root, tiny_ckpt, tmp_path, capsys):
    common = ["--data", SPEC, "--data-root", str(data_root), "--workers", "0", "--batch-size", "16",
              "--results", str(tmp_path / "results.jsonl"), "--device", "cpu"]
    knn, probe, report = _script("knn"), _script("linear_probe"), _script("report")
    assert knn(["--checkpoint", str(tiny_ckpt), "--k", "5,10", *common]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("knn: ") and "(test, dim 96)" in line and "k=5" in line and "1-NN" in line
    out = json.loads((tiny_ckpt.parent / "eval" / "knn.json").read_text())
    assert [(r["protocol"], r["k"]) for r in out["results"]] == [("knn", 5), ("knn", 10), ("knn-majority", 1)]
    assert probe(["--checkpoint", str(tiny_ckpt), "--wd", "1e-3,1e-1", "--max-iter", "30", *common]) == 0
    assert "linear probe (fast)" in capsys.readouterr().out
    assert probe(["--checkpoint", "pixels:8", "--wd", "1e-2", "--max-iter", "30", "--out", str(tmp_path / "px"), *common]) == 0
    assert knn(["--checkpoint", "random:test_resnet", "--stem", "small", "--input-size", "16", "--k", "5",
                "--out", str(tmp_path / "rnd"), *common]) == 0
    rows = load_rows(tmp_path / "results.jsonl")
    assert len(rows) == 3 + 1 + 1 + 2
    row = rows[0]
    for field in ("model", "model_ref", "model_identity", "method", "data", "data_fingerprint", "n_train", "n_val",
                  "protocol", "k", "T", "top1", "top5", "feature_dim", "seconds", "git_sha", "timestamp"):
        assert field in row
    assert row["method"] == "test" and row["n_train"] == 60 and row["n_val"] == 30 and row["T"] == 0.07
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in rows)
    assert [r["cached"] for r in rows[:4]] == [False, False, False, True]  # the probe reused the kNN features
    assert report(["--results", str(tmp_path / "results.jsonl")]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| model | method | dim | kNN k=5 | kNN k=10 | 1-NN | linear (fast) |" in md
    assert "pixels8" in md and "random-test_resnet-small-16" in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1


def test_full_probe_runs_and_resumes(data_root, tmp_path, capsys):
    probe = _script("linear_probe")
    args = ["--checkpoint", "pixels:8", "--data", SPEC, "--data-root", str(data_root), "--workers", "0",
            "--full", "--epochs", "2", "--batch-size", "16", "--out", str(tmp_path / "full"),
            "--results", str(tmp_path / "r.jsonl"), "--device", "cpu"]
    assert probe(args) == 0
    first = json.loads((tmp_path / "full" / "linear_probe_full.json").read_text())["results"][0]
    assert first["protocol"] == "linear-full" and first["extra"]["epochs"] == 2
    assert (tmp_path / "full" / "linear_probe_full.state.safetensors").is_file()
    assert probe(args) == 0  # resumes from the finished state: no training, same layer, same numbers
    again = load_rows(tmp_path / "r.jsonl")[-1]
    assert (again["top1"], again["top5"]) == (first["top1"], first["top5"])
    assert _exit_code(probe, [*args, "--lr", "0.5"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_clear_errors_on_mismatches(data_root, tmp_path, capsys):
    knn, probe = _script("knn"), _script("linear_probe")
    common = ["--data-root", str(data_root), "--workers", "0", "--results", str(tmp_path / "r.jsonl"), "--device", "cpu"]
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    folder = tmp_path / "imf"
    for split, classes in (("train", ("a", "b", "c")), ("val", ("a", "b"))):
        for c in classes:
            (folder / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / split / c / "0.png")
    no_val = tmp_path / "noval"
    (no_val / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(no_val / "train" / "a" / "0.png")
    cases = [
        (knn, ["--checkpoint", str(tmp_path / "missing.safetensors"), "--data", SPEC], "does not exist"),
        (probe, ["--checkpoint", str(bad), "--data", SPEC], "garbage.safetensors"),
        (knn, ["--checkpoint", "pixels:8", "--data", f"imagefolder:{folder}"], "train has 3 classes but val has 2"),
        (probe, ["--checkpoint", "pixels:8", "--data", f"imagefolder:{no_val}"], "split folder"),
        (knn, ["--checkpoint", "pixels:8", "--data", SPEC, "--k", "500"], "--k 500"),
    ]
    for main, argv, message in cases:
        assert _exit_code(main, [*argv, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_results_table_tolerates_a_torn_line_and_keeps_latest(tmp_path, capsys):
    def row(model, top1, k=20):
        return {"model": model, "model_identity": model, "features": "backbone", "data": "synthetic",
                "data_fingerprint": "a/b", "n_train": 10, "n_val": 5, "num_classes": 2, "protocol": "knn", "k": k,
                "T": 0.07, "top1": top1, "top5": 100.0, "method": "x", "feature_dim": 4}

    table = tmp_path / "r.jsonl"
    append_rows(table, [row("a", 10.0), row("b", 20.0)])
    with open(table, "a") as f:
        f.write('{"model": "c", "top1"')  # a writer killed mid-line
    append_rows(table, [row("a", 30.0)])
    rows = load_rows(table)
    assert "skipped 1 malformed" in capsys.readouterr().err
    assert [(r["model"], r["top1"]) for r in latest(rows)] == [("a", 30.0), ("b", 20.0)]
    md = render_markdown(rows)
    assert "| a | x | 4 | 30.0 |" in md and "| b | x | 4 | 20.0 |" in md
    csv_table = tmp_path / "r.csv"
    append_rows(csv_table, [row("a", 10.0)])
    append_rows(csv_table, [row("b", 20.0, k=10)])
    back = load_rows(csv_table)
    assert [(r["model"], r["k"], r["top1"]) for r in back] == [("a", 20, 10.0), ("b", 10, 20.0)]


def test_fp16_overflow_is_refused(data_root, monkeypatch):
    ds = build_dataset(SPEC, "val", root=data_root, verbose=False)
    src = resolve_source("pixels:4")
    src.embed = lambda x: x.flatten(1) * 1e6
    with pytest.raises(ConfigError, match="float32"):
        extract_features(src, ds, CPU, workers=0, cache_dir=None, progress=False)
    assert feat_mod.DTYPES == ("float16", "float32")


def test_gpu_index_path_is_wired_like_the_cpu_one(monkeypatch):
    """faiss-gpu is not installed here: a stand-in with its Python API checks the GPU branch."""
    import faiss

    made = []

    class FakeGpuIndexFlatIP:
        def __init__(self, res, dim, cfg):
            assert isinstance(res, fake.StandardGpuResources) and cfg.device == 0
            made.append(res)
            self._index = faiss.IndexFlatIP(dim)

        def add(self, x):
            self._index.add(x)

        def search(self, x, k):
            return self._index.search(x, k)

    fake = types.SimpleNamespace(StandardGpuResources=type("StandardGpuResources", (), {}),
                                 GpuIndexFlatConfig=lambda: types.SimpleNamespace(device=-1),
                                 GpuIndexFlatIP=FakeGpuIndexFlatIP, IndexFlatIP=faiss.IndexFlatIP)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    monkeypatch.setattr("fkd_ssl.evaluation.knn._GPU_RESOURCES", {})
    bank, _ = _clustered(200, 8, 3, seed=8)
    queries, _ = _clustered(30, 8, 3, seed=9)
    gpu = knn_search(bank, queries, 5, bank_chunk=64, use_gpu=True)
    monkeypatch.setitem(sys.modules, "faiss", faiss)
    cpu = knn_search(bank, queries, 5, use_gpu=False)
    assert len(made) == 4 and len({id(r) for r in made}) == 1  # one resources object, reused per shard
    assert np.array_equal(gpu[1], cpu[1]) and np.allclose(gpu[0], cpu[0])


def test_exported_probe_classifier_predicts_what_the_probe_measured(data_root, tiny_ckpt, tmp_path, capsys):
    from fkd_ssl.checkpoint import load_model

    out = tmp_path / "teacher" / "model.safetensors"
    common = ["--data", SPEC, "--data-root", str(data_root), "--workers", "0", "--device", "cpu", "--no-cache",
              "--results", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "ev")]
    probe = _script("linear_probe")
    assert probe(["--checkpoint", str(tiny_ckpt), "--wd", "1e-3", "--input-size", "24", *common,
                  "--export-classifier", str(out)]) == 0
    top1 = json.loads((tmp_path / "ev" / "linear_probe.json").read_text())["results"][0]["top1"]
    model, meta = load_model(out, expect="classifier")
    source, _ = load_model(tiny_ckpt)
    assert meta["method"] == "linear-probe" and model.spec.num_classes == 10 and model.spec.input_size == 24
    assert all(torch.equal(v, source.backbone.state_dict()[k]) for k, v in model.backbone.state_dict().items()
               if not k.startswith("fc."))
    val = build_dataset(SPEC, "val", root=data_root, verbose=False)
    transform = resolve_source(str(out)).transform
    x = torch.stack([transform(val.load(i)) for i in range(len(val))])
    with torch.no_grad():
        acc = 100.0 * (model.logits(x).argmax(1).numpy() == np.array(val.targets)).mean()
    assert abs(acc - top1) < 1e-3  # the result file rounds to 4 decimals
    with pytest.raises(SystemExit):
        probe(["--checkpoint", "pixels:8", *common, "--export-classifier", str(tmp_path / "x")])
    assert "--export-classifier needs" in capsys.readouterr().err
