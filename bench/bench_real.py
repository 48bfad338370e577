"""Issue 13's claims on real images: the built-in ``groceries`` photographs (default) or ``mnist5k`` scans.

Every model is trained and judged by the project's own commands (``fkd_ssl.commands.<name>.main``,
as ``bench_students.py`` does), one after another in this process (run it alone):

- baselines: raw pixels, random init (the students' architecture and size);
- self-supervised: the ImageNet EfficientNet-Lite0 teacher as it is, at whichever ``--effnet-views``
  size its own kNN is best; a store of its features; the FKD student (``distill_ssl`` defaults, K = 4);
  MoCo alone (``pretrain_teacher``, the student's architecture and size) for the FKD student's time;
- supervised: a classifier teacher (``--sup-teacher``), its top-5 soft labels and ReLabel map; FKD,
  plain-label and ReLabel students (``distill_sup``) at equal views.

kNN (k = 20) and the fast linear probe read frozen backbones; val top-1 is a classifier's own
head.  Prints a markdown table and the claim lines with whether each holds; rerunning skips
finished runs.

    python bench/bench_real.py                     # groceries
    python bench/bench_real.py --data mnist5k --size 32 --effnet-views 64,96 --views 4 --ssl-epochs 8 \
        --sup-teacher trained --sup-epochs 8 --sup-crops 1 --out runs/bench-real-mnist5k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_students import _call, _knn20, _last, _meta

from fkd_ssl.commands import distill_ssl, distill_sup, gen_label_map, gen_targets, linear_probe
from fkd_ssl.commands import pretrain_teacher, train_classifier


def _probe(run: Path, ev: list[str], source: list | None = None) -> float:
    _call(linear_probe.main, [*ev, *(source or ["--checkpoint", run / "model.safetensors"]), "--out", run / "probe"])
    return float(json.loads(next((run / "probe").glob("linear_probe*.json")).read_text())["results"][0]["top1"])


def _row(name: str, run: Path, ev: list[str], source: list | None = None, **extra) -> dict:
    return {"model": name, "knn": _knn20(run, ev, source), "probe": _probe(run, ev, source), **extra}


def _trained(name: str, run: Path, ev: list[str], val: bool = False) -> dict:
    return _row(name, run, ev, seconds=_meta(run)["train_seconds"], val=_last(run, "val_top1") if val else None)


def baseline_rows(a, ev: list[str]) -> list[dict]:
    return [_row(f"raw pixels ({a.size}x{a.size})", a.out / "pixels", ev, ["--checkpoint", f"pixels:{a.size}"]),
            _row(f"random init ({a.arch}, {a.size} px)", a.out / "random", ev,
                 ["--checkpoint", f"random:{a.arch}", "--input-size", a.size])]


def ssl_rows(a, common: list[str], ev: list[str]) -> tuple[list[dict], dict]:
    """The SSL rows, and the EfficientNet-Lite0 view size with the best kNN (its store's) with that kNN."""
    teachers = [_row(f"EfficientNet-Lite0 (ImageNet) at {v} px", a.out / f"effnet-{v}", ev,
                     ["--checkpoint", "effnet-lite0", "--input-size", v]) for v in a.effnet_views]
    best = max(range(len(teachers)), key=lambda i: teachers[i]["knn"])
    view, store, fkd, moco = a.effnet_views[best], a.out / "store-effnet", a.out / "fkd-ssl", a.out / "moco-alone"
    _call(gen_targets.main, [*common, "--teacher", "effnet-lite0", "--target", "feature", "--view-size", view,
                             "--views-per-image", a.views, "--batch-size", 128, "--out", store])
    _call(distill_ssl.main, [*common, "--store", store, "--arch", a.arch, "--input-size", a.size,
                             "--crops-per-image", 4, "--epochs", a.ssl_epochs, "--batch-size", a.batch, "--out", fkd])
    _call(pretrain_teacher.main, [*common, "--arch", a.arch, "--input-size", a.size, "--epochs", 1000,
                                  "--max-minutes", f"{_meta(fkd)['train_seconds'] / 60:.4f}", "--out", moco])
    return [*teachers, _trained(f"FKD SSL student (EffNet-{view} store, K = 4)", fkd, ev),
            _trained("MoCo alone (student arch, FKD's time)", moco, ev)], {"view": view, "knn": teachers[best]["knn"]}


def sup_rows(a, common: list[str], ev: list[str], effnet: dict) -> list[dict]:
    teacher, store, lmap = a.out / "classifier", a.out / "store-soft", a.out / "labelmap"
    if a.sup_teacher == "probe":  # the quick start's: EfficientNet-Lite0 with a probe fitted on the train labels
        ckpt = teacher / "probe" / "classifier.safetensors"
        top1 = _probe(teacher, ev, ["--checkpoint", "effnet-lite0", "--input-size", effnet["view"],
                                    "--export-classifier", ckpt])
        teacher_row = {"model": "classifier teacher (EfficientNet-Lite0 + linear probe)", "knn": effnet["knn"],
                       "probe": top1, "val": top1}
    else:
        _call(train_classifier.main, [*common, "--arch", a.arch, "--input-size", a.size, "--epochs", a.teacher_epochs,
                                      "--label-smoothing", 0, "--out", teacher])
        ckpt, teacher_row = teacher / "model.safetensors", _trained("classifier teacher", teacher, ev, val=True)
    _call(gen_targets.main, [*common, "--teacher", ckpt, "--views-per-image", a.views, "--out", store])
    _call(gen_label_map.main, [*common, "--teacher", ckpt, "--input-size", 2 * a.size, "--out", lmap])
    student = [*common, "--arch", a.arch, "--input-size", a.size, "--epochs", a.sup_epochs, "--batch-size", a.batch]
    modes = [(f"FKD sup student (soft labels, K = {a.sup_crops})", "fkd-sup",
              ["--store", store, "--crops-per-image", a.sup_crops]),
             ("plain-label student", "plain", ["--targets", "hard"]),
             ("ReLabel student", "relabel", ["--targets", "relabel", "--label-map", lmap])]
    rows = [teacher_row]
    for name, folder, flags in modes:
        _call(distill_sup.main, [*student, *flags, "--out", a.out / folder])
        rows.append(_trained(name, a.out / folder, ev, val=True))
    return rows


def render(rows: list[dict]) -> str:
    def f(v):
        return "—" if v is None else f"{v:.1f}"
    lines = ["| model | kNN top-1 (k=20) | linear probe top-1 | val top-1 (own head) | train s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {f(r['knn'])} | {f(r['probe'])} | {f(r.get('val'))} | "
              f"{'—' if r.get('seconds') is None else round(r['seconds'])} |" for r in rows]
    return "\n".join(lines)


def claims(rows: list[dict]) -> list[str]:
    by = {r["model"].split(" (")[0]: r for r in rows}
    fkd, pixels, rand, moco = by["FKD SSL student"], by["raw pixels"], by["random init"], by["MoCo alone"]
    teacher = max((r for r in rows if r["model"].startswith("EfficientNet")), key=lambda r: r["knn"])
    sup, plain, relabel = by["FKD sup student"], by["plain-label student"], by["ReLabel student"]
    half = rand["knn"] + (teacher["knn"] - rand["knn"]) / 2

    def line(ok: bool, text: str) -> str:
        return f"- [{'holds' if ok else 'FAILS'}] {text}"
    return [line(fkd["knn"] >= pixels["knn"] + 5, f"SSL: FKD student >= raw pixels + 5 kNN: {fkd['knn']:.1f} vs "
                                                    f"{pixels['knn']:.1f} ({fkd['knn'] - pixels['knn']:+.1f})"),
            line(fkd["knn"] >= rand["knn"] + 5, f"SSL: FKD student >= random init + 5 kNN: {fkd['knn']:.1f} vs "
                                                  f"{rand['knn']:.1f} ({fkd['knn'] - rand['knn']:+.1f})"),
            line(fkd["knn"] > moco["knn"], f"SSL: FKD student > MoCo alone at equal training time, kNN: "
                                           f"{fkd['knn']:.1f} vs {moco['knn']:.1f} ({fkd['knn'] - moco['knn']:+.1f}; "
                                           f"{fkd['seconds']:.0f} s vs {moco['seconds']:.0f} s)"),
            line(fkd["knn"] >= half, f"SSL: FKD student closes >= half the kNN distance random init -> teacher: "
                                     f"{fkd['knn']:.1f} vs {half:.1f} (random {rand['knn']:.1f}, "
                                     f"teacher {teacher['knn']:.1f})"),
            line(sup["val"] >= plain["val"] + 2, f"sup: FKD student >= plain labels + 2 val top-1: {sup['val']:.1f} vs "
                                                 f"{plain['val']:.1f} ({sup['val'] - plain['val']:+.1f})"),
            line(sup["val"] >= relabel["val"], f"sup: FKD student >= ReLabel val top-1: {sup['val']:.1f} vs "
                                               f"{relabel['val']:.1f} ({sup['val'] - relabel['val']:+.1f})")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="groceries")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", type=Path, default=Path("runs/bench-real"))
    p.add_argument("--arch", default="resnet10t", help="every student's (and a trained classifier teacher's) architecture")
    p.add_argument("--size", type=int, default=64, help="their input side, and the raw-pixel side")
    p.add_argument("--effnet-views", default="64,128", help="EfficientNet-Lite0 view sides to try (its best is used)")
    p.add_argument("--views", type=int, default=8, help="R stored views per image")
    p.add_argument("--batch", type=int, default=128, help="views per step of every student")
    p.add_argument("--ssl-epochs", type=int, default=48, help="SSL student: views per image")
    p.add_argument("--sup-teacher", choices=("probe", "trained"), default="probe",
                   help="probe: EfficientNet-Lite0 at its best view with a linear probe as classifier (the quick "
                        "start's); trained: --arch trained on the labels for --teacher-epochs")
    p.add_argument("--teacher-epochs", type=int, default=6, help="--sup-teacher trained: its epochs")
    p.add_argument("--sup-epochs", type=int, default=48, help="supervised students: views per image")
    p.add_argument("--sup-crops", type=int, default=4, help="K of the supervised FKD student")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    a.effnet_views = [int(v) for v in a.effnet_views.split(",")]
    common = ["--data", a.data, "--workers", a.workers, "--device", a.device, "--seed", 0]
    if a.data_root:
        common += ["--data-root", a.data_root]
    ev = [*common, "--results", a.out / "results.jsonl"]
    a.out.mkdir(parents=True, exist_ok=True)
    ssl, effnet = ssl_rows(a, common, ev)
    rows = baseline_rows(a, ev) + ssl + sup_rows(a, common, ev, effnet)
    text = render(rows) + "\n\n" + "\n".join(claims(rows))
    print(text)
    (a.out / "real.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
