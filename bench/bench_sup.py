"""Seconds per epoch of the supervised student: FKD vs plain labels vs ReLabel vs online teacher.

The paper's Table (8 V100, ResNet-50, batch 1024): vanilla 579.36 s, ReLabel 762.11 s, FKD
486.77 s per epoch.  Here, side by side in one run on ImageNet-sized JPEGs (~500x375, made in a
temp folder) and a 1000-class classifier teacher (random weights: speed does not depend on
training), every mode trains the same student with the same views per step through
``fkd-distill-sup`` (:mod:`fkd_ssl.commands.distill_sup`):

* ``fkd``     -- ``--targets store``: K = 4 stored views per decoded image, top-5 soft labels read
               from the store (the teacher never runs);
* ``plain``   -- ``--targets hard``: one fresh RandomResizedCrop per decoded image, dataset labels;
* ``relabel`` -- ``--targets relabel``: one fresh crop per decoded image, its label RoIAligned on the
               teacher's top-5 dense label map (made once by ``gen_label_map.py``) + softmax;
* ``online``  -- ``--targets online``: K = 4 views per decoded image, the teacher labels them at
               every step (vanilla KD).

Two measurements, each side by side in one run with the modes interleaved (``--repeats``
rounds, medians reported):

1. *the data pipeline alone*: views/s of each mode's dataset (the one ``distill_sup.py`` builds:
   decode, crops, resize, targets; online: also the teacher-size views) read in this process on
   one thread, as one DataLoader worker does -- what sets the epoch time when the accelerator
   waits on the CPU, as on the paper's 8 V100s;
2. *training*: seconds per epoch of ``distill_sup.py`` itself (``--data-only`` skips it).  An
   epoch is one view per image (FKD's accounting: K views of each decoded image are K epochs'
   worth), so every mode sees the same number of views; seconds per epoch = the run's training
   time / its epochs.

The ReLabel map is made at ``--label-map-size`` (480: 15x15 locations for a stride-32 teacher,
as ReLabel's published ImageNet maps), so RoIAlign pools a 1000 x 15 x 15 map per crop.  Prints
ratios; never asserts.

    python bench/bench_sup.py --data-only --workers 1   # the data pipelines: ~6 minutes on 2 cores
    python bench/bench_sup.py --student-arch resnet10t --student-size 64 --teacher-arch resnet18 \
        --epochs 12 --modes fkd,plain,relabel --workers 1  # + training, a light student: ~7 minutes
    python bench/bench_sup.py                           # + training, ResNet-18 at 112 px: ~20 minutes
    python bench/bench_sup.py --device cuda --images 4096 --student-size 224 --teacher-size 224 \
        --batch-size 256 --workers 12 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

PAPER = {"fkd": 486.77, "plain": 579.36, "relabel": 762.11}  # s/epoch, 8 V100, ResNet-50, batch 1024


def _run(command: str, argv: list[str]) -> None:
    """``fkd-<command> argv`` in this process."""
    import importlib

    code = importlib.import_module(f"fkd_ssl.commands.{command}").main(argv)
    if code:
        raise SystemExit(f"{command} failed with exit {code}")


def data_rate(argv: list[str], seconds: float) -> tuple[float, int]:
    """Views/s of one mode's data pipeline alone: ``distill_sup.py``'s dataset for ``argv``, items
    ``(image, 0)`` read in this process on one thread for about ``seconds`` (decode, crops, resize,
    targets; no student).  Returns (views/s, K)."""
    import torch

    from fkd_ssl.commands import distill_sup
    from fkd_ssl.data import build_dataset
    from fkd_ssl.dist import DistContext

    p = distill_sup.build_parser()
    args = p.parse_args(argv)
    distill_sup.check(p, args)
    train_set = build_dataset(args.data, "train", args.data_root, verbose=False)
    dataset = distill_sup.training_data(args, train_set, DistContext(0, 1, 0, torch.device("cpu"))).dataset
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        dataset[(0, 0)]
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            dataset[(n % len(dataset), 0)]
            n += 1
        return n * dataset.k / (time.perf_counter() - t0), dataset.k
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4, help="views per image per run (a multiple of 4)")
    p.add_argument("--batch-size", type=int, default=64, help="views per step, every mode")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--student-arch", default="resnet18")
    p.add_argument("--student-size", type=int, default=112)
    p.add_argument("--teacher-arch", default="resnet50")
    p.add_argument("--teacher-size", type=int, default=160)
    p.add_argument("--label-map-size", type=int, default=480,
                   help="side the teacher sees the whole image at for the ReLabel map (480: 15x15 maps for a "
                        "stride-32 teacher, the size of ReLabel's published ImageNet maps)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-seconds", type=float, default=10.0,
                   help="seconds per mode and round of the data-pipeline-only measurement")
    p.add_argument("--modes", default="fkd,plain,relabel,online",
                   help="comma-separated subset of fkd, plain, relabel, online (fkd is always measured)")
    p.add_argument("--data-only", action="store_true", help="measure the data pipelines only, no training")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = p.parse_args()
    if args.epochs % 4:
        p.error("--epochs must be a multiple of 4 (K = 4)")
    wanted = set(args.modes.split(","))
    if not wanted <= {"fkd", "plain", "relabel", "online"}:
        p.error(f"--modes: unknown {sorted(wanted - {'fkd', 'plain', 'relabel', 'online'})}")

    import torch

    from fkd_ssl.checkpoint import save_model
    from fkd_ssl.data.synthetic import write_photo_jpegs
    from fkd_ssl.models import Encoder, ModelSpec, count_flops

    tmp = Path(tempfile.mkdtemp(prefix="bench_sup_"))
    try:
        data = tmp / "jpegs"
        write_photo_jpegs(data / "train", args.images)
        write_photo_jpegs(data / "val", 8)
        spec = f"imagefolder:{data}"
        torch.manual_seed(0)
        teacher = Encoder(ModelSpec(arch=args.teacher_arch, num_classes=1000, input_size=args.teacher_size)).eval()
        ckpt = str(save_model(tmp / "teacher" / "model", teacher, {"method": "bench"}))
        student = Encoder(ModelSpec(arch=args.student_arch, num_classes=1000, input_size=args.student_size))
        f_t, f_s = count_flops(teacher, args.teacher_size), count_flops(student, args.student_size)
        print(f"teacher {args.teacher_arch}@{args.teacher_size}: {f_t / 1e9:.2f} GFLOPs/view; student "
              f"{args.student_arch}@{args.student_size}: {f_s / 1e9:.2f} GFLOPs/view; {args.images} JPEGs ~500x375",
              flush=True)
        common = ["--data", spec, "--data-root", str(tmp / "root"), "--device", args.device, "--workers",
                  str(args.workers)]
        t0 = time.time()
        _run("gen_targets", [*common, "--teacher", ckpt, "--views-per-image", str(args.epochs),
                                            "--codec", "topk", "--topk", "5", "--out", str(tmp / "store")])
        t_store = time.time() - t0
        t0 = time.time()
        _run("gen_label_map", [*common, "--teacher", ckpt, "--topk", "5", "--input-size",
                                              str(args.label_map_size), "--out", str(tmp / "lmap")])
        t_map = time.time() - t0
        print(f"done once: store {t_store:.1f} s, ReLabel label map {t_map:.1f} s", flush=True)

        student_args = [*common, "--arch", args.student_arch, "--input-size", str(args.student_size),
                        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--no-val",
                        "--crop-min", "0.08"]
        modes = {
            "fkd": ["--targets", "store", "--store", str(tmp / "store"), "--crops-per-image", "4"],
            "plain": ["--targets", "hard", "--crops-per-image", "1"],
            "relabel": ["--targets", "relabel", "--label-map", str(tmp / "lmap"), "--crops-per-image", "1"],
            "online": ["--targets", "online", "--teacher", ckpt, "--crops-per-image", "4"],
        }
        modes = {m: a for m, a in modes.items() if m == "fkd" or m in wanted}
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(args.repeats):  # the data pipeline alone, interleaved
            for name, extra in modes.items():
                rates[name].append(data_rate([*student_args, *extra, "--out", str(tmp / "unused")], args.data_seconds)[0])
        rate = {m: float(np.median(v)) for m, v in rates.items()}
        print("\ndata pipeline alone (decode + crops + targets, 1 thread; median views/s), relative to FKD:")
        for m, r in rate.items():
            print(f"  {m:8s} {r:8.1f} views/s  {rate['fkd'] / r:.2f}x the time per view")
        print(f"ordering (fastest first): {' < '.join(sorted(rate, key=rate.get, reverse=True))}\n", flush=True)

        if args.data_only:
            return
        per_epoch: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            for name, extra in modes.items():
                out = tmp / f"{name}-{rep}"
                _run("distill_sup", [*student_args, *extra, "--out", str(out)])
                meta = json.loads((out / "model.json").read_text())
                per_epoch[name].append(float(meta["train_seconds"]) / args.epochs)
                print(f"  {name:8s} rep {rep}: {per_epoch[name][-1]:.2f} s/epoch", flush=True)
        med = {m: float(np.median(v)) for m, v in per_epoch.items()}
        print("\nseconds per epoch (median), and relative to FKD; paper (8 V100, ResNet-50) beside:")
        for m, s in med.items():
            paper = f"{PAPER[m]:.2f} s ({PAPER[m] / PAPER['fkd']:.2f}x)" if m in PAPER else "not reported"
            print(f"  {m:8s} {s:8.2f} s  {s / med['fkd']:.2f}x   paper: {paper}")
        order = sorted(med, key=med.get)
        print(f"ordering (fastest first): {' < '.join(order)}")
        slower = ", ".join(f"{m} {rate['fkd'] / rate[m]:.2f}x" for m in rate if m != "fkd")
        print(f"data pipeline alone: {' < '.join(sorted(rate, key=rate.get, reverse=True))} ({slower} FKD's time "
              f"per view)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
