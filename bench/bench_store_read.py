"""Random-access read throughput: the target store vs FKD's published one-file-per-image layout.

Both hold, for N images x R views, each view's crop box and flip and the teacher's top-5 class
probabilities (C = 1000).  A student reads K random views of a random image; every path returns
the crop boxes and flips and the marginal-smoothed targets float32 (K, C), checked equal.

* store: as gen_targets.py writes it (crop + flip views recomputed from the seed, nothing stored
  per view but the top-5), ``TargetStore.read(i, views)``, one call per image; and the same store
  with the geometry stored as float32 (5 per view, what format version 1 did), for the trade-off;
* published layout: one file per image written as FKD's generator does, ``torch.save([coords (R, 4)
  float32, flips (R,) bool, labels (R, 2, 5) float32])`` of numpy arrays, read with plain
  ``torch.load(weights_only=False)`` (what FKD's training code does) and with this project's
  safe loader (``fkd_ssl.interop.fkd_layout.load_label_file``, no unpickling of code).

Warm: the files in the page cache (best of 3 interleaved passes).  Cold: every file of both
layouts evicted with ``os.posix_fadvise(POSIX_FADV_DONTNEED)`` before each pass (the store is
reopened so none of its pages stay mapped).  ``--dir`` must be on a disk (not tmpfs).

    python bench/bench_store_read.py [--images 3000] [--views 64] [--k 4] [--dir runs/bench-read]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fkd_ssl.interop.fkd_layout import load_label_file
from fkd_ssl.store import StoreWriter, TargetStore, finalize, make_codec
from fkd_ssl.store.geometry import Geometry, ReplayGeometry
from fkd_ssl.views import VIEW_PARAM_DIM, ViewConfig, sample_views

C, TOPK, SIZE, SEED = 1000, 5, (375, 500), 0
CFG = ViewConfig(size=224, scale=(0.08, 1.0), photometric=False, interpolation="bicubic")


def build(root: Path, N: int, R: int) -> tuple[Path, Path, Path]:
    codec = make_codec("topk", k=TOPK, num_classes=C)
    store, stored, files = root / "store", root / "store-float32", root / "per_image"
    files.mkdir(parents=True)
    kw = dict(num_images=N, views_per_image=R, target_dim=C, codec=codec, shard_size=4096,
              provenance={"command": "bench"})
    w = StoreWriter.create_or_resume(store, {"bench": "read"}, param_dim=VIEW_PARAM_DIM, **kw,
                                     geometry=ReplayGeometry(VIEW_PARAM_DIM, CFG.to_dict(), SEED))
    w5 = StoreWriter.create_or_resume(stored, {"bench": "read"}, param_dim=5, **kw, geometry=Geometry(5))
    for start in range(0, N, 50):
        idx = np.arange(start, min(start + 50, N))
        params = np.stack([sample_views(CFG, SEED, i, range(R), *SIZE) for i in idx])
        z = 3 * np.random.default_rng(start).standard_normal((len(idx), R, C)).astype(np.float32)
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        w.write(idx, params, probs, sizes=[SIZE] * len(idx))
        w5.write(idx, np.ascontiguousarray(params[..., :5]), probs)
        enc = codec.encode(probs.reshape(-1, C))
        labels = np.stack([enc["idx"], enc["val"]], 1).astype(np.float32).reshape(len(idx), R, 2, TOPK)
        for b, i in enumerate(idx):
            torch.save([params[b, :, :4].copy(), params[b, :, 4] > 0.5, labels[b]], files / f"{i:07d}.tar")
    for writer, path in ((w, store), (w5, stored)):
        writer.complete_owned()
        finalize(path)
    return store, stored, files


def read_plain(files: Path, i: int, views: np.ndarray, codec):
    # the baseline as FKD's training code reads its files (an unrestricted unpickler); only ever
    # called on the files build() wrote a moment ago into this run's own scratch folder, never on
    # a file a user received (those go through the safe loader, read_safe below)
    coords, flips, labels = torch.load(files / f"{i:07d}.tar", weights_only=False)
    lab = labels[views]
    return coords[views], flips[views], codec.decode({"idx": lab[:, 0].astype(np.uint16),
                                                      "val": lab[:, 1].astype(np.float16)})


def read_safe(files: Path, i: int, views: np.ndarray, codec):
    lab = load_label_file(files / f"{i:07d}.tar")
    return lab.coords[views], lab.flips[views], codec.decode({"idx": lab.indices[views].astype(np.uint16),
                                                              "val": lab.values[views].astype(np.float16)})


def evict(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="views read per image")
    ap.add_argument("--reads", type=int, default=1000, help="images read per timed pass")
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-read"), help="scratch folder on a disk (deleted)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    N, R, K = a.images, a.views, a.k
    shutil.rmtree(a.dir, ignore_errors=True)
    store_path, stored_path, files = build(a.dir, N, R)
    codec = TargetStore.open(store_path).codec
    rng = np.random.default_rng(0)
    order = rng.integers(0, N, a.reads)
    views = np.stack([rng.choice(R, K, replace=False) for _ in range(a.reads)])

    def via(store):
        def read(i, v):
            p, t = store.read(i, v)
            return p[:, :4], p[:, 4] > 0.5, t
        return read

    def paths(store, stored):
        return {"store": via(store), "store, float32 geometry stored": via(stored),
                "plain torch.load": lambda i, v: read_plain(files, i, v, codec),
                "safe loader": lambda i, v: read_safe(files, i, v, codec)}

    def reopen():
        for f in (store_path, stored_path, files):
            evict(f)
        return TargetStore.open(store_path), TargetStore.open(stored_path)

    store, stored = TargetStore.open(store_path), TargetStore.open(stored_path)
    for i, v in zip(order[:50], views[:50]):  # every path gives the same boxes, flips and targets
        got = [f(int(i), v) for f in paths(store, stored).values()]
        assert all(np.array_equal(x, y) for g in got[1:] for x, y in zip(got[0], g))

    def timed(f) -> float:
        t0 = time.perf_counter()
        for i, v in zip(order, views):
            f(int(i), v)
        return a.reads / (time.perf_counter() - t0)

    warm = {k: [] for k in paths(store, stored)}
    for f in paths(store, stored).values():
        timed(f)  # warm-up
    for _ in range(3):
        for name, f in paths(store, stored).items():
            warm[name].append(timed(f))
    cold = {k: [] for k in warm}
    for _ in range(2):
        for name in cold:
            opened = reopen()
            for f in (store_path, stored_path):
                evict(f)  # what open() read; no page of a store is mapped yet
            cold[name].append(timed(paths(*opened)[name]))
    mb = {p: f"{sum(f.stat().st_size for f in p.iterdir()) / 1e6:.1f} MB" for p in (store_path, stored_path, files)}
    print(f"N={N} images, R={R} views, K={K} random views read per random image, top-{TOPK} of C={C}, 1 thread; "
          f"store {mb[store_path]} (float32 geometry: {mb[stored_path]}), published layout {mb[files]} in {N} files")
    print("| read path | warm: images/s | warm: store is | cold: images/s | cold: store is |")
    print("|---|---:|---:|---:|---:|")
    for name in warm:
        w, c = max(warm[name]), max(cold[name])
        print(f"| {name} | {w:,.0f} | {max(warm['store']) / w:.1f}x | {c:,.0f} | {max(cold['store']) / c:.1f}x |")
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
