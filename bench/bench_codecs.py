"""Target codecs: bytes per view, fidelity, and the projected store size for ImageNet-1k.

Features (D = 128, a projection head; D = 1280, an EfficientNet-Lite pooled feature) are
synthetic but shaped like real ones: ReLU of a random low-rank (rank 64) map, non-negative and
correlated.  Fidelity is the mean cosine between a held-out set and its round trip; pq is
trained on a separate sample.  Class probabilities (C = 1000) are ``softmax(t * z)`` of
standard normal logits with t = 3 (as in the tests) and t = 6 (more peaked, closer to a
trained ImageNet teacher); fidelity is KL(full || decoded) in nats, next to the KL of exact
(float32) top-k marginal smoothing, which the codec can at best reach.

Geometry is P float32 per view: 5 (crop y, x, h, w as fractions of the image, flip) or 9 (plus
4 photometric parameters).  The projected size is N x R x (target + geometry bytes) + N bytes
of done mask, for N = 1,281,167 ImageNet-1k training images.

Prints a markdown table (docs/store.md holds a copy).

    python bench/bench_codecs.py [--eval 2000] [--train 20000]

``--students``: student accuracy per codec instead.  One ``gen_targets.py`` store per codec of the
same views (same seed, teacher and data: views are a pure function of the seed), the same SSL
student trained from each (``fkd-distill-ssl``, K = 4), judged by kNN (k = 20) and the fast
linear probe, side by side.  Runs one after another; rerunning skips finished runs.

    python bench/bench_codecs.py --students [--data synthetic:train=2000,val=500] [--epochs 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fkd_ssl.store import make_codec

IMAGENET = 1_281_167
VIEWS = (40, 500)
GEOMETRY = {"crop+flip (P=5)": 5, "+ photometric (P=9)": 9}


def features(n: int, D: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(D).standard_normal((64, D)).astype(np.float32) / 8
    return np.maximum(rng.standard_normal((n, 64)).astype(np.float32) @ basis, 0)


def probs(n: int, C: int, temp: float, seed: int) -> np.ndarray:
    z = temp * np.random.default_rng(seed).standard_normal((n, C)).astype(np.float32)
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def mean_cos(a: np.ndarray, b: np.ndarray) -> float:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(1) / np.maximum(den, 1e-30)))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    with np.errstate(divide="ignore"):
        terms = p * (np.log(np.maximum(p, 1e-30)) - np.log(q))
    return float(np.mean(np.sum(np.where(p > 0, terms, 0.0), 1)))


def exact_smoothing(p: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    val = np.take_along_axis(p, top, 1)
    out = np.repeat(((1 - val.sum(1)) / (p.shape[1] - k))[:, None], p.shape[1], 1)
    np.put_along_axis(out, top, val, 1)
    return out


def gb(bytes_per_view: int, P: int, R: int) -> float:
    return (IMAGENET * R * (bytes_per_view + 4 * P) + IMAGENET) / 1e9


def student_rows(a) -> list[str]:
    """One markdown row per codec: bytes/view, store MB, kNN and probe top-1 of a student trained from it."""
    import json
    from pathlib import Path

    from bench_students import _call, _knn20
    from fkd_ssl.commands import distill_ssl, gen_targets, linear_probe
    from fkd_ssl.store import TargetStore

    out = Path(a.out)
    common = ["--data", a.data, "--workers", 1, "--device", "cpu", "--seed", 0]
    rows = []
    for flags in (["--codec", "fp32"], ["--codec", "fp16"], ["--codec", "int8"],
                  ["--codec", "pq", "--pq-m", a.dim // 8], ["--codec", "pq", "--pq-m", a.dim // 32]):
        name = "-".join(map(str, flags[1::2]))
        store, run = out / f"store-{name}", out / f"student-{name}"
        _call(gen_targets.main, [*common, "--teacher", "effnet-lite0", "--target", "feature", "--view-size",
                                 a.view, "--views-per-image", a.views, *flags, "--out", store])
        _call(distill_ssl.main, [*common, "--store", store, "--arch", "resnet10t", "--input-size", a.size,
                                 "--crops-per-image", 4, "--epochs", a.epochs, "--batch-size", 128, "--out", run])
        _call(linear_probe.main, [*common, "--checkpoint", run / "model.safetensors", "--out", run / "probe",
                                  "--no-cache", "--results", out / "results.jsonl"])
        probe = json.loads(next((run / "probe").glob("linear_probe*.json")).read_text())["results"][0]["top1"]
        s = TargetStore.open(store)
        rows.append(f"| {' '.join(map(str, flags))} | {s.codec.bytes_per_view(s.target_dim)} | "
                    f"{s.nbytes() / (s.num_images * s.views_per_image):.1f} | {_knn20(run, common):.1f} | {probe:.1f} |")
    return ["| gen_targets.py flags | target bytes/view | store bytes/view (all files) | kNN top-1 (k=20) | "
            "probe top-1 |", "|---|---:|---:|---:|---:|"] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=2000, help="rows to measure fidelity on")
    ap.add_argument("--train", type=int, default=20000, help="pq training rows")
    ap.add_argument("--students", action="store_true", help="student accuracy per codec (see above)")
    ap.add_argument("--data", default="synthetic:train=2000,val=500")
    ap.add_argument("--out", default="runs/bench-codecs")
    ap.add_argument("--epochs", type=int, default=8, help="student epochs")
    ap.add_argument("--views", type=int, default=8, help="R stored views per image")
    ap.add_argument("--view", type=int, default=48, help="the teacher's view side")
    ap.add_argument("--size", type=int, default=32, help="the student's side")
    ap.add_argument("--dim", type=int, default=1280, help="the teacher's target dimension (pq M = dim/8, dim/32)")
    a = ap.parse_args()
    if a.students:
        print("\n".join(student_rows(a)))
        return
    rows = []  # (codec, dim, bytes/view, fidelity text, seconds to encode eval rows)
    for D in (128, 1280):
        x = features(a.eval, D, seed=1)
        for name, kw in (("fp32", {}), ("fp16", {}), ("int8", {}), ("pq", {"M": D // 8}), ("pq", {"M": D // 32})):
            codec = make_codec(name, **kw)
            fit = ""
            if codec.trained:
                t0 = time.perf_counter()
                codec.fit(features(a.train, D, seed=2))
                fit = f", fit {time.perf_counter() - t0:.0f} s"
            t0 = time.perf_counter()
            enc = codec.encode(x)
            te = time.perf_counter() - t0
            cos = mean_cos(x, codec.decode(enc))
            label = name + (f" M={kw['M']}" if kw else "")
            rows.append((label, f"D={D}", codec.bytes_per_view(D), f"cos {cos:.5f}", f"{a.eval / te:,.0f} rows/s{fit}"))
    for k in (5, 10):
        for mode in ("smooth", "renorm"):
            codec = make_codec("topk", k=k, num_classes=1000, mode=mode)
            fid = []
            for temp in (3, 6):
                p = probs(a.eval, 1000, temp, seed=3)
                t0 = time.perf_counter()
                enc = codec.encode(p)
                te = time.perf_counter() - t0
                q = codec.decode(enc)
                if mode == "smooth":
                    fid.append(f"t={temp}: KL {kl(p, q):.3f} (exact smoothing {kl(p, exact_smoothing(p, k)):.3f})")
                else:
                    fid.append(f"t={temp}: KL inf (top-{k} mass {float(np.sort(p, 1)[:, -k:].sum(1).mean()):.2f})")
            rows.append((f"topk k={k} {mode}", "C=1000", codec.bytes_per_view(1000), "; ".join(fid), f"{a.eval / te:,.0f} rows/s"))

    geo = " | ".join(f"R={R} {g}" for g in GEOMETRY for R in VIEWS)
    print(f"| codec | dim | bytes/view | fidelity | encode speed | ImageNet-1k GB: {geo} |")
    print("|" + "---|" * (5 + len(GEOMETRY) * len(VIEWS)))
    for label, dim, b, fid, speed in rows:
        sizes = " | ".join(f"{gb(b, P, R):,.1f}" for P in GEOMETRY.values() for R in VIEWS)
        print(f"| {label} | {dim} | {b} | {fid} | {speed} | {sizes} |")
    print()
    print("geometry bytes per view: " + ", ".join(f"{g}: {4 * P}" for g, P in GEOMETRY.items()) +
          "; done mask: 1 byte per image; GB = 1e9 bytes.")


if __name__ == "__main__":
    main()
