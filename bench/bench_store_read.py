"""Random-access read throughput: the target store vs FKD's published one-file-per-image layout.

Both hold, for N images x R views, the crop box (4 floats), the flip, and the teacher's top-5
class probabilities (C = 1000).  A student reads K random views of a random image; both paths
return the same thing: geometry float32 (K, 5) and marginal-smoothed targets float32 (K, C).

* store: ``TargetStore.read(i, views)`` (one call per image; also batched, 256 images per call);
* published layout: one ``torch.save`` file per image holding ``[coords (R, 4) float,
  flips (R,) bool, [label (2, 5) = [indices; values] for each crop]]``, read with
  ``torch.load(weights_only=True)``.

Both are warm (just written, in the page cache; dropping the cache needs root).  Prints
images/s of both and their ratio (measured side by side in this run).

    python bench/bench_store_read.py [--images 3000] [--views 64] [--k 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fkd_ssl.store import StoreWriter, TargetStore, finalize, make_codec

C, TOPK = 1000, 5


def teacher(idx: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """Fake teacher output for images ``idx``: params (B,R,5) float32, probs (B,R,C) float32."""
    rng = np.random.default_rng(int(idx[0]))
    params = rng.random((len(idx), R, 5), dtype=np.float32)
    params[..., 4] = params[..., 4] > 0.5
    z = 3 * rng.standard_normal((len(idx), R, C)).astype(np.float32)
    z = np.exp(z - z.max(-1, keepdims=True))
    return params, (z / z.sum(-1, keepdims=True)).astype(np.float32)


def build(root: Path, N: int, R: int) -> tuple[Path, Path, float, float]:
    codec = make_codec("topk", k=TOPK, num_classes=C)
    store = root / "store"
    files = root / "per_image"
    files.mkdir()
    w = StoreWriter.create_or_resume(store, {"bench": "read"}, num_images=N, views_per_image=R, param_dim=5,
                                     target_dim=C, codec=codec, shard_size=1024, provenance={"command": "bench"})
    t_store = t_files = 0.0
    for start in range(0, N, 50):
        idx = np.arange(start, min(start + 50, N))
        params, probs = teacher(idx, R)
        t0 = time.perf_counter()
        w.write(idx, params, probs)
        t_store += time.perf_counter() - t0
        enc = codec.encode(probs.reshape(-1, C))
        ind = enc["idx"].reshape(len(idx), R, TOPK).astype(np.float32)
        val = enc["val"].reshape(len(idx), R, TOPK).astype(np.float32)
        t0 = time.perf_counter()
        for b, i in enumerate(idx):
            labels = [torch.from_numpy(np.stack([ind[b, r], val[b, r]])) for r in range(R)]
            torch.save([torch.from_numpy(params[b, :, :4].copy()), torch.from_numpy(params[b, :, 4] > 0.5), labels],
                       files / f"{i:07d}.pth")
        t_files += time.perf_counter() - t0
    t0 = time.perf_counter()
    w.complete_owned()
    finalize(store)
    t_store += time.perf_counter() - t0
    return store, files, t_store, t_files


def read_files(files: Path, i: int, views: np.ndarray, codec) -> tuple[np.ndarray, np.ndarray]:
    coords, flips, labels = torch.load(files / f"{i:07d}.pth", weights_only=True)
    params = torch.cat([coords[views], flips[views, None].float()], 1).numpy()
    lab = torch.stack([labels[int(r)] for r in views]).numpy()  # (K, 2, 5)
    return params, codec.decode({"idx": lab[:, 0].astype(np.uint16), "val": lab[:, 1].astype(np.float16)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="views read per image")
    ap.add_argument("--reads", type=int, default=3000, help="images read per timed pass (store)")
    ap.add_argument("--file-reads", type=int, default=500, help="images read per timed pass (published layout)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    N, R, K = a.images, a.views, a.k
    with tempfile.TemporaryDirectory() as tmp:
        store_path, files, t_ws, t_wf = build(Path(tmp), N, R)
        store = TargetStore.open(store_path)
        codec = store.codec
        rng = np.random.default_rng(0)
        order = rng.integers(0, N, a.reads)
        views = np.stack([rng.choice(R, K, replace=False) for _ in range(a.reads)])

        # correctness: both paths give the same geometry and targets
        for i, v in zip(order[:50], views[:50]):
            p1, t1 = store.read(int(i), v)
            p2, t2 = read_files(files, int(i), v, codec)
            assert np.array_equal(p1, p2) and np.array_equal(t1, t2)

        def time_store() -> float:
            t0 = time.perf_counter()
            for i, v in zip(order, views):
                store.read(int(i), v)
            return a.reads / (time.perf_counter() - t0)

        def time_store_batched(B: int = 256) -> float:
            t0 = time.perf_counter()
            for s in range(0, a.reads, B):
                ii = np.repeat(order[s:s + B], K)
                store.read(ii, views[s:s + B].reshape(-1))
            return a.reads / (time.perf_counter() - t0)

        def time_files() -> float:
            n = min(a.file_reads, a.reads)
            t0 = time.perf_counter()
            for i, v in zip(order[:n], views[:n]):
                read_files(files, int(i), v, codec)
            return n / (time.perf_counter() - t0)

        for f in (time_store, time_files):  # warm-up pass each
            f()
        res = {"store": [], "store_batched": [], "files": []}
        for _ in range(3):  # interleaved, best of 3
            res["store"].append(time_store())
            res["store_batched"].append(time_store_batched())
            res["files"].append(time_files())
        best = {k: max(v) for k, v in res.items()}
        size_store = store.nbytes()
        size_files = sum(f.stat().st_size for f in files.iterdir())
        print(f"N={N} images, R={R} views, K={K} views read per image, top-{TOPK} of C={C}; warm page cache, 1 thread")
        print(f"| layout | images/s | ratio | size on disk | write time |")
        print(f"|---|---|---|---|---|")
        print(f"| store, one read() per image | {best['store']:,.0f} | {best['store'] / best['files']:.1f}x "
              f"| {size_store / 1e6:.1f} MB in {len(list(store_path.iterdir()))} files | {t_ws:.1f} s |")
        print(f"| store, 256 images per read() | {best['store_batched']:,.0f} | {best['store_batched'] / best['files']:.1f}x | | |")
        print(f"| published: torch.load per image | {best['files']:,.0f} | 1.0x "
              f"| {size_files / 1e6:.1f} MB in {N} files | {t_wf:.1f} s |")
        print(f"ratio store / published (one image per call): {best['store'] / best['files']:.1f}x")


if __name__ == "__main__":
    main()
