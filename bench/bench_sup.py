"""Seconds per epoch of the supervised student: FKD vs plain labels vs ReLabel vs online teacher.

The paper's Table (8 V100, ResNet-50, batch 1024): vanilla 579.36 s, ReLabel 762.11 s, FKD
486.77 s per epoch.  Here, side by side in one run on ImageNet-sized JPEGs (~500x375, made in a
temp folder) and a 1000-class classifier teacher (random weights: speed does not depend on
training), every mode trains the same student with the same views per step through
``experiments/distill_sup.py``:

* ``fkd``     -- ``--targets store``: K = 4 stored views per decoded image, top-5 soft labels read
               from the store (the teacher never runs);
* ``plain``   -- ``--targets hard``: one fresh RandomResizedCrop per decoded image, dataset labels;
* ``relabel`` -- ``--targets relabel``: one fresh crop per decoded image, its label RoIAligned on the
               teacher's top-5 dense label map (made once by ``gen_label_map.py``) + softmax;
* ``online``  -- ``--targets online``: K = 4 views per decoded image, the teacher labels them at
               every step (vanilla KD).

An epoch is one view per image (FKD's accounting: K views of each decoded image are K epochs'
worth), so every mode sees the same number of views.  Seconds per epoch = the run's training
time / its epochs; the runs are interleaved (``--repeats`` rounds) and the median is reported.
Prints ratios; never asserts.

    python bench/bench_sup.py                       # CPU sized, about 5 minutes on 2 cores
    python bench/bench_sup.py --device cuda --images 4096 --student-size 224 --teacher-size 224 \
        --batch-size 256 --workers 12 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PAPER = {"fkd": 486.77, "plain": 579.36, "relabel": 762.11}  # s/epoch, 8 V100, ResNet-50, batch 1024


def _run(script: str, argv: list[str]) -> None:
    from fkd_ssl.pipeline import load_script

    code = load_script(script).main(argv)
    if code:
        raise SystemExit(f"{script} failed with exit {code}")


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
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = p.parse_args()
    if args.epochs % 4:
        p.error("--epochs must be a multiple of 4 (K = 4)")

    import torch

    from bench_distill import _make_jpegs
    from fkd_ssl.checkpoint import save_model
    from fkd_ssl.models import Encoder, ModelSpec, count_flops

    tmp = Path(tempfile.mkdtemp(prefix="bench_sup_"))
    try:
        data = tmp / "jpegs"
        _make_jpegs(data / "train", args.images)
        _make_jpegs(data / "val", 8)
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
        _run("experiments/gen_targets.py", [*common, "--teacher", ckpt, "--views-per-image", str(args.epochs),
                                            "--codec", "topk", "--topk", "5", "--out", str(tmp / "store")])
        t_store = time.time() - t0
        t0 = time.time()
        _run("experiments/gen_label_map.py", [*common, "--teacher", ckpt, "--topk", "5", "--out", str(tmp / "lmap")])
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
        per_epoch: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            for name, extra in modes.items():
                out = tmp / f"{name}-{rep}"
                _run("experiments/distill_sup.py", [*student_args, *extra, "--out", str(out)])
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
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
