"""Tests of the target store (fkd_ssl.store): codecs, writing, resuming, sharding, reading, checks.

Also runnable as a script (``python tests/test_store.py write PATH ...``): the subprocess
writer used by the SIGKILL and two-rank tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fkd_ssl.errors import ConfigError, DataError
from fkd_ssl.store import StoreIdentity, StoreWriter, TargetStore, finalize, make_codec, owned_shards
from fkd_ssl.store import layout as L

N, R, P, C = 40, 6, 5, 50  # images, views per image, geometry floats, classes
SHARD = 9  # -> 5 shards, the last one holding 4 images
IDENTITY = {"teacher": "toy", "teacher_sha256": "ab12", "input_size": 32, "mean": [0.5, 0.5, 0.5],
            "sampler": {"scale": [0.08, 1.0], "flip": 0.5}, "dataset": "synthetic:n=40"}
PROVENANCE = {"command": "test", "git_sha": "test"}
SKIP = (13,)  # an "unreadable" image in every test store
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- helpers


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def views(idx: np.ndarray, dim: int = C, kind: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic fake teacher output for images ``idx``: params (B,R,P) float32 and
    targets (B,R,dim) float32 (probabilities or features), a pure function of the index."""
    ps, ts = [], []
    for i in np.asarray(idx).tolist():
        rng = np.random.default_rng(1000 + i)
        ps.append(rng.random((R, P), dtype=np.float32))
        z = rng.standard_normal((R, dim)).astype(np.float32)
        ts.append(softmax(3 * z) if kind == "probs" else z)
    return np.stack(ps), np.stack(ts)


def make_writer(path, codec=None, **kw) -> StoreWriter:
    args = dict(num_images=N, views_per_image=R, param_dim=P, target_dim=C, shard_size=SHARD,
                codec=codec or make_codec("topk", k=5, num_classes=C), provenance=PROVENANCE)
    args.update(kw)
    identity = args.pop("identity", IDENTITY)
    return StoreWriter.create_or_resume(path, identity, **args)


def fill(w: StoreWriter, batch: int = 3, limit: int | None = None, delay: float = 0.0, kind: str = "probs",
         dim: int = C) -> int:
    """Write (or skip) up to ``limit`` missing images of the writer's shards; returns how many."""
    todo = w.missing_images()
    if limit is not None:
        todo = todo[:limit]
    for k in range(0, len(todo), batch):
        b = todo[k:k + batch]
        for i in b:
            if int(i) in SKIP:
                w.skip(int(i), f"/data/img{int(i)}.jpg", "cannot identify image file")
        b = np.array([i for i in b if int(i) not in SKIP], dtype=np.int64)
        if len(b):
            w.write(b, *views(b, dim, kind))
        if delay:
            time.sleep(delay)
    return len(todo)


def build(path, **kw) -> Path:
    """An uninterrupted single-process store."""
    w = make_writer(path, **kw)
    fill(w)
    w.complete_owned()
    finalize(path)
    return Path(path)


def tree(path: Path) -> dict[str, bytes]:
    """Every file's bytes (log.jsonl, the only volatile file, left out)."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.name != L.LOG}


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    diff = [n for n in ta if ta[n] != tb[n]]
    assert not diff, f"files differ: {diff}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted store every resumed / sharded variant must equal byte for byte."""
    return build(tmp_path_factory.mktemp("ref") / "store")


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30))), axis=1)


def mean_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


# ----------------------------------------------------------------------------- codecs


def test_feature_codecs_round_trip_within_stated_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 128)).astype(np.float32)
    relu = np.maximum(x @ rng.standard_normal((128, 128)).astype(np.float32), 0) / 8
    for data in (x, relu):
        fp32 = make_codec("fp32")
        assert np.array_equal(fp32.decode(fp32.encode(data)), data)
        fp16 = make_codec("fp16")
        assert mean_cos(data, fp16.decode(fp16.encode(data))) > 0.99999
        int8 = make_codec("int8")
        enc = int8.encode(data)
        assert enc["q"].dtype == np.int8 and enc["scale"].dtype == np.float32
        dec = int8.decode(enc)
        assert mean_cos(data, dec) > 0.9999
        assert np.all(np.abs(dec - data) <= enc["scale"][:, None] / 2 + 1e-6)
    assert make_codec("fp32").bytes_per_view(128) == 512 and make_codec("fp16").bytes_per_view(128) == 256
    assert make_codec("int8").bytes_per_view(128) == 132
    with pytest.raises(DataError, match="float16 range"):
        make_codec("fp16").encode(np.full((1, 4), 1e6, np.float32))
    zero = make_codec("int8")
    assert np.array_equal(zero.decode(zero.encode(np.zeros((2, 8), np.float32))), np.zeros((2, 8), np.float32))


@pytest.fixture(scope="module")
def pq_codec():
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((16, 64)).astype(np.float32)
    sample = np.maximum(rng.standard_normal((6000, 16)).astype(np.float32) @ basis, 0)
    return make_codec("pq", M=8).fit(sample), sample, basis


def test_pq_round_trip_deterministic_and_batch_independent(pq_codec):
    import faiss

    codec, sample, basis = pq_codec
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((3000, 16)).astype(np.float32) @ basis, 0)
    enc = codec.encode(x)
    assert enc["codes"].dtype == np.uint8 and enc["codes"].shape == (3000, 8)
    assert codec.bytes_per_view(64) == 8
    assert mean_cos(x, codec.decode(enc)) > 0.9  # stated: docs/store.md (M = D/8, realistic features)
    # a row's code does not depend on its batch (resumed stores are byte-identical)
    parts = np.concatenate([codec.encode(x[a:b])["codes"] for a, b in ((0, 1), (1, 700), (700, 2999), (2999, 3000))])
    assert np.array_equal(parts, enc["codes"])
    # long sub-vectors (dsub = 32) are coded by our own batch-independent path: same codes as faiss
    wide = make_codec("pq", M=2).fit(sample)
    codes = wide.encode(x)["codes"]
    pq = faiss.ProductQuantizer(64, 2, 8)
    faiss.copy_array_to_vector(wide.centroids.ravel(), pq.centroids)
    assert np.mean(pq.compute_codes(x) == codes) > 0.999
    parts = np.concatenate([wide.encode(x[a:b])["codes"] for a, b in ((0, 1), (1, 700), (700, 3000))])
    assert np.array_equal(parts, codes)
    # an exact tie (a duplicated centroid) goes to the lower centroid index, in any batch
    wide.centroids = wide.centroids.copy()
    wide.centroids[0, 9] = wide.centroids[0, 4]
    wide._tab = wide._pq = None
    ties = np.concatenate([wide.centroids[0, 4][None].repeat(3, 0), x[:3, 32:]], axis=1)
    assert wide.encode(ties)["codes"][:, 0].tolist() == [4, 4, 4]
    assert wide.encode(np.concatenate([x[:300], ties]))["codes"][300:, 0].tolist() == [4, 4, 4]
    # training is deterministic
    again = make_codec("pq", M=8).fit(sample)
    assert np.array_equal(again.centroids, codec.centroids) and again.params == codec.params
    with pytest.raises(ConfigError, match="not divisible"):
        make_codec("pq", M=7).fit(sample)
    with pytest.raises(ConfigError, match="nbits"):
        make_codec("pq", M=8, nbits=4)


def half_toward_zero(v: float) -> float:
    """The float16 nearest to ``v`` that is not larger than it (v >= 0)."""
    h = np.float16(v)
    return float(h) if float(h) <= v else float(np.nextafter(h, np.float16(0)))


def reference_smoothing(p: np.ndarray, k: int) -> np.ndarray:
    """FKD marginal smoothing, written plainly: keep the k largest (as stored: float16 rounded
    toward zero), spread the rest of the mass evenly over the other classes."""
    out = np.empty_like(p, dtype=np.float64)
    for b, row in enumerate(p.tolist()):
        top = sorted(range(len(row)), key=lambda j: -row[j])[:k]
        kept = {j: half_toward_zero(row[j]) for j in top}
        rest = (1.0 - sum(kept.values())) / (len(row) - k)
        for j in range(len(row)):
            out[b, j] = kept.get(j, rest)
    return out


def test_topk_marginal_smoothing_matches_reference_and_stated_kl():
    rng = np.random.default_rng(3)
    p = softmax(3 * rng.standard_normal((64, 1000)).astype(np.float32))
    codec = make_codec("topk", k=5, num_classes=1000)
    enc = codec.encode(p)
    assert enc["idx"].dtype == np.uint16 and enc["val"].dtype == np.float16 and codec.bytes_per_view(1000) == 20
    q = codec.decode(enc)
    assert q.dtype == np.float32 and q.shape == p.shape
    np.testing.assert_allclose(q, reference_smoothing(p, 5), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)
    # stated error: only fp16 rounding on top of exact FKD smoothing; KL(full || decoded) < 1.2 here
    exact = np.sort(p, axis=1)[:, ::-1][:, :5]
    ideal = np.repeat(((1 - exact.sum(1)) / 995)[:, None], 1000, 1)
    np.put_along_axis(ideal, np.argsort(-p, axis=1, kind="stable")[:, :5], exact, 1)
    assert abs(kl(p, q).mean() - kl(p, ideal).mean()) < 1e-3
    assert kl(p, q).mean() < 1.2
    # renorm: the top-k rescaled to 1, the rest 0
    rn = make_codec("topk", k=5, num_classes=1000, mode="renorm")
    qr = rn.decode(rn.encode(p))
    np.testing.assert_allclose(qr.sum(1), 1.0, atol=1e-5)
    assert ((qr > 0).sum(1) == 5).all()
    top = np.argsort(-p, axis=1)[:, :5]
    np.testing.assert_allclose(np.take_along_axis(qr, top, 1), exact / exact.sum(1, keepdims=True), rtol=2e-3)
    with pytest.raises(DataError, match="probabilities"):
        codec.encode(3 * rng.standard_normal((2, 1000)).astype(np.float32))  # logits, not softmax
    with pytest.raises(ConfigError):
        make_codec("topk", k=5, num_classes=70000)
    with pytest.raises(ConfigError, match="unknown codec"):
        make_codec("zip")


# ----------------------------------------------------------------------------- write / read


def test_write_read_random_access_is_exact(tmp_path):
    w = make_writer(tmp_path / "s", codec=make_codec("fp32"))
    assert fill(w, kind="features") == N
    w.complete_owned()
    finalize(tmp_path / "s")
    s = TargetStore.open(tmp_path / "s", verify=True)
    assert (s.num_images, s.views_per_image, s.param_dim, s.target_dim) == (N, R, P, C)
    assert s.manifest["identity"] == IDENTITY and s.manifest["provenance"] == PROVENANCE
    assert s.identity.to_dict() == IDENTITY and s.identity.teacher == "toy" and s.identity.extra["sampler"]["flip"] == 0.5
    rng = np.random.default_rng(4)
    valid = s.valid_indices()
    i = rng.choice(valid, 200)
    r = rng.integers(0, R, 200)
    p_true, t_true = views(np.arange(N), kind="features")
    assert s.params_batch(i, r).dtype == np.float32
    assert np.array_equal(s.params_batch(i, r), p_true[i, r])  # bit-exact geometry
    assert np.array_equal(s.targets(i, r), t_true[i, r])
    p2, t2 = s.read(i, r)
    assert np.array_equal(p2, p_true[i, r]) and np.array_equal(t2, t_true[i, r])
    assert np.array_equal(s.params(int(i[0]), int(r[0])), p_true[i[0], r[0]])
    assert s.targets(5, np.arange(R)).shape == (R, C)  # one image, all its views (broadcast)
    with pytest.raises(IndexError):
        s.targets([N], [0])
    with pytest.raises(IndexError):
        s.targets([0], [R])
    assert s.nbytes() > N * R * (4 * P + 4 * C)


def test_expected_identity_is_checked_on_open(reference):
    TargetStore.open(reference, expect_identity={"dataset": "synthetic:n=40", "sampler": {"flip": 0.5}})
    with pytest.raises(ConfigError, match=r"dataset: 'synthetic:n=40' \(expected 'cifar10'\)"):
        TargetStore.open(reference, expect_identity={"dataset": "cifar10"})
    with pytest.raises(ConfigError, match=r"sampler\.scale"):
        TargetStore.open(reference, expect_identity={"sampler": {"scale": [0.2, 1.0]}})


def test_skipped_images_are_excluded(reference):
    s = TargetStore.open(reference)
    assert s.skipped == frozenset(SKIP)
    assert s.skipped_entries == [{"index": 13, "path": "/data/img13.jpg", "reason": "cannot identify image file"}]
    assert 13 not in s.valid_indices() and len(s.valid_indices()) == N - 1
    with pytest.raises(DataError, match="image 13 was skipped"):
        s.targets([12, 13], [0, 0])


def test_resume_after_dropped_writer_is_byte_identical(tmp_path, reference):
    path = tmp_path / "s"
    w = make_writer(path)
    fill(w, batch=4, limit=11)
    w.complete_shard(0)
    del w  # "killed": nothing closed or finalised
    w = make_writer(path)
    assert len(w.missing_images()) == N - 11
    fill(w, batch=5, limit=7)  # other batch sizes than the reference
    w = make_writer(path)
    fill(w, batch=2)
    assert len(w.missing_images()) == 0
    w.complete_owned()
    with pytest.raises(ConfigError, match="is complete"):
        w.write(np.array([0]), *views(np.array([0])))
    finalize(path)
    assert_same_tree(path, reference)


def test_skip_then_written_on_rerun_keeps_store_consistent(tmp_path, reference):
    path = tmp_path / "s"
    w = make_writer(path)
    w.skip(3, "/data/img3.jpg", "transient read error")
    w.skip(13, "/data/img13.jpg", "cannot identify image file")
    del w
    # as if killed after the skip list was saved but before image 3's done flag was set
    done = np.load(path / L.shard_file(0, "done.npy"), mmap_mode="r+")
    done[3] = 0
    done.flush()
    del done
    w = make_writer(path)
    assert w.missing_images()[:4].tolist() == [0, 1, 2, 3]
    fill(w)  # image 3 is readable this time
    w.complete_owned()
    finalize(path)
    assert_same_tree(path, reference)


def _writer_cmd(path: Path, *args: str) -> list[str]:
    return [sys.executable, str(HERE), "write", str(path), *args]


def _done_count(path: Path) -> int:
    total = 0
    for f in sorted(path.glob("shard-*.done.npy")):
        try:
            total += int((np.load(f, mmap_mode="r") != 0).sum())
        except (ValueError, OSError):
            pass
    return total


def test_sigkill_at_any_moment_then_resume_is_byte_identical(tmp_path, reference):
    path = tmp_path / "s"
    rng = np.random.default_rng(5)
    # killed around start-up / creation, then between batches, then mid-write
    for target, delay in ((0, "0.01"), (6, "0.01"), (15, "0"), (28, "0.01")):
        proc = subprocess.Popen(_writer_cmd(path, "--batch", "1", "--delay", delay), stderr=subprocess.PIPE)
        t0 = time.monotonic()
        if target == 0:
            time.sleep(float(rng.uniform(0.1, 0.5)))
        while _done_count(path) < target and proc.poll() is None and time.monotonic() - t0 < 30:
            time.sleep(0.001)
        time.sleep(float(rng.uniform(0, 0.003)))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
    assert _done_count(path) < N  # it was really interrupted
    w = make_writer(path)
    fill(w)
    w.complete_owned()
    finalize(path)
    assert_same_tree(path, reference)
    TargetStore.open(path, verify=True)


def test_two_rank_writers_plus_finalize_equal_one_process(tmp_path, reference):
    path = tmp_path / "s"
    S = L.num_shards(N, SHARD)
    procs = [subprocess.Popen(_writer_cmd(path, "--rank", str(r), "--world", "2"), stderr=subprocess.PIPE)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    assert owned_shards(S, 0, 2) == [0, 2, 4] and owned_shards(S, 1, 2) == [1, 3]
    finalize(path, timeout_s=10)
    assert_same_tree(path, reference)
    # and sequentially with two writer objects in one process
    path2 = tmp_path / "s2"
    for rank in (1, 0):
        w = make_writer(path2, shards=owned_shards(S, rank, 2))
        fill(w)
        if rank == 1:
            with pytest.raises(ConfigError, match="not owned"):
                w.write(np.array([0]), *views(np.array([0])))  # image 0 is in shard 0, rank 0's
        w.complete_owned()
        if rank == 1:
            with pytest.raises(DataError, match="incomplete"):
                finalize(path2)
    finalize(path2)
    assert_same_tree(path2, reference)


# ----------------------------------------------------------------------------- integrity


def test_flipped_byte_in_any_file_is_found_by_verify(tmp_path, pq_codec):
    codec = make_codec("pq", M=8)
    codec.load_state(pq_codec[0].state_arrays(), pq_codec[0].params)
    path = tmp_path / "s"
    w = make_writer(path, codec=codec, target_dim=64)
    fill(w, kind="features", dim=64)
    w.complete_owned()
    finalize(path)
    s = TargetStore.open(path, verify=True)
    names = s.files() + [L.HEADER]
    assert any(n.startswith("codec.centroids-") for n in names)
    for name in names:
        f = path / name
        orig = f.read_bytes()
        data = bytearray(orig)
        data[len(data) - 3 if name.endswith(".npy") else len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        try:
            with pytest.raises(DataError, match=name.replace(".", r"\.")):
                TargetStore.open(path).verify()  # a codec file already fails at open, naming it
            if name == L.shard_file(1, "records.npy"):
                r = subprocess.run([sys.executable, "-m", "fkd_ssl.store", "verify", str(path)],
                                   capture_output=True, text=True)
                assert r.returncode != 0 and name in r.stderr and "\n" not in r.stderr.strip()
        finally:
            f.write_bytes(orig)
    r = subprocess.run([sys.executable, "-m", "fkd_ssl.store", "verify", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stderr


def test_truncated_or_missing_array_is_found_on_open(tmp_path, reference):
    import shutil

    path = tmp_path / "s"
    shutil.copytree(reference, path)
    TargetStore.open(path)
    rec = path / L.shard_file(2, "records.npy")
    orig = rec.read_bytes()
    rec.write_bytes(orig[:-100])
    with pytest.raises(DataError, match=r"shard-00002\.records\.npy is truncated"):
        TargetStore.open(path)
    rec.unlink()
    with pytest.raises(DataError, match=r"shard-00002\.records\.npy is missing"):
        TargetStore.open(path)
    rec.write_bytes(orig)
    (path / L.shard_file(4, "sha256.json")).unlink()
    with pytest.raises(DataError, match=r"shard-00004\.sha256\.json is missing"):
        TargetStore.open(path)
    (path / L.MANIFEST).unlink()
    with pytest.raises(DataError, match="not finished"):
        TargetStore.open(path)
    with pytest.raises(DataError, match="not a target store"):
        TargetStore.open(tmp_path)


def test_identity_mismatch_is_refused_and_overwrite_replaces_only_store_files(tmp_path):
    path = tmp_path / "s"
    w = make_writer(path)
    fill(w, limit=5)
    (path / "notes.txt").write_text("mine")
    other = {**IDENTITY, "teacher_sha256": "cd34", "sampler": {"scale": [0.25, 1.0], "flip": 0.5}}
    with pytest.raises(ConfigError, match=r"identity\.sampler\.scale.*identity\.teacher_sha256|identity\.teacher_sha256"):
        make_writer(path, identity=other)
    with pytest.raises(ConfigError, match="views_per_image"):
        make_writer(path, views_per_image=R + 1)
    with pytest.raises(ConfigError, match=r"codec\.params\.k"):
        make_writer(path, codec=make_codec("topk", k=3, num_classes=C))
    assert len(make_writer(path).missing_images()) == N - 5  # nothing was lost
    w = make_writer(path, identity=other, overwrite=True)
    assert len(w.missing_images()) == N
    assert (path / "notes.txt").read_text() == "mine"
    assert L.read_json(path / L.HEADER)["identity"]["teacher_sha256"] == "cd34"
    with pytest.raises(ConfigError, match="JSON"):
        make_writer(tmp_path / "t", identity={"x": object()})


def test_trained_codec_resumes_from_stored_codebooks(tmp_path, pq_codec):
    fitted = pq_codec[0]
    path = tmp_path / "s"
    with pytest.raises(ConfigError, match="not trained"):
        make_writer(path, codec=make_codec("pq", M=8), target_dim=64)
    w = make_writer(path, codec=fitted, target_dim=64)
    fill(w, kind="features", dim=64, limit=10)
    w2 = make_writer(path, codec=make_codec("pq", M=8), target_dim=64)  # unfitted: loads the store's
    assert w2.codec.params == fitted.params
    fill(w2, kind="features", dim=64)
    other = make_codec("pq", M=8, seed=7).fit(pq_codec[1])
    with pytest.raises(ConfigError, match="codec.params"):
        make_writer(path, codec=other, target_dim=64)
    w2.complete_owned()
    finalize(path)
    s = TargetStore.open(path, verify=True)
    _, t = views(np.arange(N), dim=64, kind="features")
    i, r = s.valid_indices(), np.zeros(N - 1, np.int64)
    np.testing.assert_allclose(s.targets(i, r), fitted.decode(fitted.encode(t[i, r])))


def test_store_identity_round_trips_through_its_dict():
    ident = StoreIdentity(teacher={"hash": "ab"}, views={"scale": (0.2, 1.0)}, seed=0, group=8,
                          dataset={"fingerprint": "f"}, extra={"geometry": "g"})
    d = ident.to_dict()
    assert d == {"teacher": {"hash": "ab"}, "views": {"scale": (0.2, 1.0)}, "seed": 0, "group": 8,
                 "dataset": {"fingerprint": "f"}, "geometry": "g"} and ident != d
    assert StoreIdentity.from_dict(d).to_dict() == d and "seed" not in StoreIdentity(teacher="t").to_dict()
    assert StoreIdentity.of(ident).views == {"scale": [0.2, 1.0]}  # as it reads back from JSON
    assert StoreIdentity.from_dict(json.loads(json.dumps(d))) == StoreIdentity.of(ident)


def test_writer_input_checks(tmp_path):
    w = make_writer(tmp_path / "s")
    p, t = views(np.array([0, 1]))
    with pytest.raises(ValueError, match="float32"):
        w.write(np.array([0, 1]), p.astype(np.float64), t)
    with pytest.raises(ValueError, match="shape"):
        w.write(np.array([0, 1]), p[:, :2], t)
    with pytest.raises(ValueError, match="twice"):
        w.write(np.array([0, 0]), p, t)
    enc = {n: a.reshape(2, R, -1) for n, a in w.codec.encode(t.reshape(2 * R, C)).items()}
    with pytest.raises(ValueError, match="encoded fields"):
        w.write_encoded(np.array([0, 1]), p, {"idx": enc["idx"]})
    with pytest.raises(ValueError, match="encoded field val is float32"):
        w.write_encoded(np.array([0, 1]), p, {**enc, "val": enc["val"].astype(np.float32)})
    w.write_encoded(np.array([0, 1]), p, enc)  # the same records as write()
    t[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        w.write(np.array([0, 1]), p, t)
    with pytest.raises(ConfigError, match="still misses"):
        w.complete_shard(0)
    with pytest.raises(ConfigError, match="target dim"):
        make_writer(tmp_path / "u", target_dim=C + 1)


# ----------------------------------------------------------------------------- workers


class _Views:
    """A map-style dataset reading K views of an image from a store (as a student's loader would)."""

    def __init__(self, store: TargetStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store.valid_indices())

    def __getitem__(self, k: int):
        i = int(self.store.valid_indices()[k])
        r = np.array([0, 2, 4, 5])
        p, t = self.store.read(i, r)
        return i, p, t, os.getpid()


def test_forked_dataloader_workers_read_the_store(reference):
    import multiprocessing as mp

    import torch
    from torch.utils.data import DataLoader

    s = TargetStore.open(reference)
    s.targets([0], [0])  # maps opened in the parent before the fork
    loader = DataLoader(_Views(s), batch_size=8, num_workers=2, multiprocessing_context=mp.get_context("fork"))
    pids, seen = set(), []
    for i, p, t, pid in loader:
        pids.update(pid.tolist())
        seen += i.tolist()
        ref = torch.from_numpy(s.targets(np.repeat(i.numpy(), 4), np.tile([0, 2, 4, 5], len(i))))
        assert torch.equal(t.reshape(-1, C), ref)
    assert sorted(seen) == s.valid_indices().tolist()
    assert os.getpid() not in pids and len(pids) == 2


# ----------------------------------------------------------------------------- subprocess writer


def _main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["write"])
    ap.add_argument("path")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args(argv)
    w = make_writer(Path(a.path), shards=owned_shards(L.num_shards(N, SHARD), a.rank, a.world))
    fill(w, batch=a.batch, delay=a.delay)
    w.complete_owned()


if __name__ == "__main__":
    _main(sys.argv[1:])


def test_digest_names_the_identity_and_the_shard_checksums(reference):
    """Students record store.digest(): equal for the same store, different once a shard changes."""
    from fkd_ssl.store import TargetStore

    a, b = TargetStore.open(reference), TargetStore.open(reference)
    assert a.digest() == b.digest() and len(a.digest()) == 16
    a.manifest["shards"] = [{"sha256": "0" * 64}]  # as if a shard had been regenerated
    assert a.digest() != b.digest()
