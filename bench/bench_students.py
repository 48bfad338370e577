"""Student studies on stored targets: FKD's crops-per-image ablation, and the SSL student's settings.

``--study crops`` (default): K = 1, 2, 4, 8 stored views per decoded image at equal views, in
both variants, each student trained by its own command with the same flags but
``--crops-per-image``: the same ``--epochs`` (views per image) and ``--batch-size`` (views per
step), so every K sees the same number of views and optimizer steps; K only changes how many
of them come from one decoded image (one pass over the images is K epochs).  Each K > 1 runs in
every layout of ``--spreads``: its K views in one step (FKD's loader) and spread over 4K steps
(``--spread-steps``, the students' default).  Supervised: a
classifier teacher trained here, its top-5 soft labels in a store, students judged by val
top-1 of their own classifier.  Self-supervised: the ImageNet EfficientNet-Lite0 teacher's
features in a store, students judged by kNN (k = 20).  Seconds per epoch = each run's training
time / its epochs, measured one run after another in this process (run it alone).  Writes a
markdown table and a plot; rerunning skips finished runs.

``--study ssl``: the SSL student's loss / optimiser / centring settings on the EfficientNet-Lite0
feature store at K = 4 (each row one ``fkd-distill-ssl`` run, judged by kNN k = 20), with random
init and the teacher itself for reference.

    python bench/bench_students.py                                  # K ablation, ~35 min on 2 CPU cores
    python bench/bench_students.py --variants sup --crops 1,4 --sup-epochs 8 --sup-lr 0.2 --bn  # the K = 4 diagnosis
    python bench/bench_students.py --study ssl                      # SSL settings, ~20 min
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fkd_ssl.commands import distill_ssl, distill_sup, gen_targets, knn, train_classifier


def _call(main, argv: list[str]) -> None:
    if main([str(a) for a in argv]):
        raise SystemExit(f"failed: {main.__module__} {' '.join(map(str, argv))}")


def _meta(run: Path) -> dict:
    return json.loads((run / "model.json").read_text())


def _last(run: Path, key: str) -> float:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if key in r]
    return float(rows[-1][key])


def _knn20(run: Path, common: list[str], source: list | None = None) -> float:
    """kNN top-1 (k = 20) of ``run``'s model, or of ``source`` (checkpoint flags) written under ``run``."""
    _call(knn.main, [*common, *(source or ["--checkpoint", run / "model.safetensors"]), "--out", run / "knn",
                     "--k", "20", "--majority-k", "none"])
    return float(json.loads(next((run / "knn").glob("knn*.json")).read_text())["results"][0]["top1"])


def _effnet_store(a, common: list[str], out: Path) -> Path:
    store = out / "store-effnet"
    _call(gen_targets.main, [*common, "--teacher", "effnet-lite0", "--target", "feature", "--view-size",
                             a.effnet_view, "--views-per-image", a.views, "--out", store])
    return store


def bn_recalibrated_top1(run: Path, data: str, data_root: str | None, images: int = 1024) -> float:
    """Val top-1 after recomputing the student's BatchNorm statistics on batches of single random
    crops of distinct images (a K > 1 run estimated them on batches of K crops per image)."""
    import torch
    from torch import nn

    from fkd_ssl.checkpoint import load_model
    from fkd_ssl.data import build_dataset
    from fkd_ssl.supervised import classifier_accuracy
    from fkd_ssl.views import RandomViewsDataset, ViewConfig, normalize

    model, _ = load_model(run / "model.safetensors")
    train, val = (build_dataset(data, split, data_root, verbose=False) for split in ("train", "val"))
    crops = RandomViewsDataset(train, ViewConfig(size=model.spec.input_size, scale=(0.08, 1.0), photometric=False),
                               seed=7, n_views=1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    model.train()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:images].tolist()
    with torch.no_grad():
        for b in range(0, len(order), 128):
            x = torch.cat([crops[(i, 0)].views for i in order[b:b + 128]])
            model.logits(normalize(x, model.spec.mean, model.spec.std))
    return classifier_accuracy(model, val)["val_top1"]


def sup_rows(a, common: list[str], out: Path) -> list[dict]:
    teacher, store = out / "classifier", out / "store-soft"
    _call(train_classifier.main, [*common, "--arch", a.arch, "--input-size", a.size, "--epochs", a.teacher_epochs,
                                  "--label-smoothing", "0", "--batch-size", a.batch, "--out", teacher])
    _call(gen_targets.main, [*common, "--teacher", teacher / "model.safetensors", "--views-per-image", a.views,
                             "--out", store])
    rows = [{"variant": "sup", "K": "teacher", "acc": _last(teacher, "val_top1"), "s_per_epoch": None}]
    for k, spread in _layouts(a):
        run = out / f"sup-k{k}-s{spread}-e{a.sup_epochs}-b{a.batch}-lr{a.sup_lr}-w{a.sup_warmup}"
        _call(distill_sup.main, [*common, "--store", store, "--arch", a.arch, "--input-size", a.size,
                                 "--crops-per-image", k, "--spread-steps", spread, "--epochs", a.sup_epochs,
                                 "--batch-size", a.batch, "--lr", a.sup_lr, "--warmup-epochs", a.sup_warmup, "--out", run])
        rows.append({"variant": "sup", "K": k, "spread": spread, "acc": _last(run, "val_top1"),
                     "bn": bn_recalibrated_top1(run, a.data, a.data_root) if a.bn else None,
                     "s_per_epoch": _meta(run)["train_seconds"] / a.sup_epochs})
    return rows


def _layouts(a) -> list[tuple[int, int]]:
    """(K, --spread-steps) of every student: K = 1 once, each K > 1 in every layout of --spreads."""
    return [(k, s * k) for k in a.crops for s in (a.spreads if k > 1 else [0])]


def ssl_rows(a, common: list[str], out: Path) -> list[dict]:
    store = _effnet_store(a, common, out)
    rows = []
    for k, spread in _layouts(a):
        run = out / f"ssl-k{k}-s{spread}-e{a.ssl_epochs}-b{a.batch}"
        _call(distill_ssl.main, [*common, "--store", store, "--arch", a.arch, "--input-size", a.ssl_size,
                                 "--crops-per-image", k, "--spread-steps", spread, "--epochs", a.ssl_epochs,
                                 "--batch-size", a.batch, "--out", run])
        rows.append({"variant": "ssl", "K": k, "spread": spread, "acc": _knn20(run, common),
                     "s_per_epoch": _meta(run)["train_seconds"] / a.ssl_epochs})
    return rows


#: the SSL study's rows: (name, epochs, distill_ssl flags); the last one is the default
SSL_STUDY = [
    ("earlier default: InfoNCE, SGD 0.015", 8, ["--optimizer", "sgd", "--lr", "0.015", "--weight-decay", "5e-4",
                                                "--warmup-epochs", "4", "--no-center"]),
    ("soft-ce (FKD-SSL), SGD 0.015", 8, ["--loss", "soft-ce", "--optimizer", "sgd", "--lr", "0.015",
                                         "--weight-decay", "5e-4", "--warmup-epochs", "4", "--no-center"]),
    ("InfoNCE, SGD 0.125", 8, ["--optimizer", "sgd", "--lr", "0.125", "--weight-decay", "5e-4", "--warmup-epochs", "4",
                               "--no-center"]),
    ("InfoNCE, SGD 0.125, centred", 8, ["--optimizer", "sgd", "--lr", "0.125", "--weight-decay", "5e-4",
                                        "--warmup-epochs", "4", "--center"]),
    ("cosine + predictor (SimReg), AdamW 5e-3, centred", 8, ["--loss", "cosine", "--predictor-hidden", "512",
                                                             "--center"]),
    ("cosine + predictor (SimReg), AdamW 5e-3, centred", 16, ["--loss", "cosine", "--predictor-hidden", "512",
                                                              "--center"]),
    ("InfoNCE, AdamW 5e-3 (the default)", 8, []),
    ("InfoNCE, AdamW 5e-3 (the default)", 16, []),
    ("InfoNCE, AdamW 5e-3, centred", 8, ["--center"]),
    ("InfoNCE, AdamW 5e-3, centred", 16, ["--center"]),
]


def ssl_study_rows(a, common: list[str], out: Path) -> list[dict]:
    store = _effnet_store(a, common, out)
    rows = [{"name": "teacher: EfficientNet-Lite0 (ImageNet)", "epochs": None,
             "acc": _knn20(out / "effnet-teacher", common, ["--checkpoint", "effnet-lite0", "--input-size",
                                                             a.effnet_view])},
            {"name": f"random init ({a.arch}, {a.ssl_size} px)", "epochs": None,
             "acc": _knn20(out / "random-init", common, ["--checkpoint", f"random:{a.arch}", "--input-size",
                                                          a.ssl_size])}]
    for name, epochs, flags in SSL_STUDY:
        run = out / f"ssl-study-e{epochs}-{'-'.join(f.strip('-') for f in flags) or 'default'}"
        _call(distill_ssl.main, [*common, "--store", store, "--arch", a.arch, "--input-size", a.ssl_size,
                                 "--crops-per-image", 4, "--epochs", epochs, "--batch-size", a.batch, *flags,
                                 "--out", run])
        rows.append({"name": name, "epochs": epochs, "acc": _knn20(run, common),
                     "seconds": _meta(run)["train_seconds"]})
    return rows


def render_study(rows: list[dict]) -> str:
    lines = ["| student settings (K = 4) | epochs | kNN top-1 (k=20) | train s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['epochs'] or '—'} | {r['acc']:.1f} | "
                     f"{round(r['seconds']) if r.get('seconds') else '—'} |")
    return "\n".join(lines)


def render(rows: list[dict], a) -> str:
    bn = any(r.get("bn") is not None for r in rows)
    lines = ["| variant | K | views of an image | accuracy | " + ("BN recomputed | " if bn else "") +
             "s / epoch | speed vs K = 1 |", "|---|---|---|---|" + ("---|" if bn else "") + "---|---|"]
    for r in rows:
        base = next((b for b in rows if b["variant"] == r["variant"] and b["K"] == 1), None)
        speed = (f"{base['s_per_epoch'] / r['s_per_epoch']:.2f}x" if base and r["s_per_epoch"] else "")
        sec = f"{r['s_per_epoch']:.2f}" if r["s_per_epoch"] else "—"
        what = "val top-1" if r["variant"] == "sup" else "kNN top-1"
        recal = (f"{r['bn']:.1f} | " if r.get("bn") is not None else "— | ") if bn else ""
        where = ("—" if r["K"] in (1, "teacher") else f"over {r['spread']} steps" if r.get("spread") else "in one step")
        lines.append(f"| {r['variant']} ({what}) | {r['K']} | {where} | {r['acc']:.1f} | {recal}{sec} | {speed} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, variant, label in ((axes[0], "sup", "val top-1 (%)"), (axes[1], "ssl", "kNN top-1 (%)")):
        rs = [r for r in rows if r["variant"] == variant and r["K"] != "teacher"]
        if not rs:
            continue
        ks = sorted({r["K"] for r in rs})
        for n, (spread, name) in enumerate(((False, "K views in one step"), (True, "spread over 4K steps"))):
            line = [r for r in rs if r["K"] == 1 or bool(r.get("spread")) == spread]
            if len(line) > 1:
                ax.plot([r["K"] for r in line], [r["acc"] for r in line], "o-" if spread else "o:", color=f"C{2 * n}",
                        label=f"accuracy, {name}")
        ax.legend(fontsize=7, loc="lower left")
        rs = [r for r in rs if r["K"] == 1 or r.get("spread")] or rs
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("crops per decoded image (K), equal views")
        ax.set_ylabel(label, color="C0")
        tw = ax.twinx()
        tw.plot([r["K"] for r in rs], [r["s_per_epoch"] for r in rs], "s--", color="C1", label="s / epoch")
        tw.set_ylabel("seconds per epoch", color="C1")
        tw.set_ylim(bottom=0)
        ax.set_title("supervised (soft labels)" if variant == "sup" else "self-supervised (features)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=("crops", "ssl"), default="crops")
    p.add_argument("--data", default="synthetic:train=2000,val=500")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", type=Path, default=Path("runs/bench-students"))
    p.add_argument("--crops", default="1,2,4,8", help="the K values (comma-separated)")
    p.add_argument("--spreads", default="0,4", help="layouts of K > 1: an image's K views over S*K steps (0: one step)")
    p.add_argument("--variants", default="sup,ssl")
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--size", type=int, default=48, help="classifier teacher and supervised student side")
    p.add_argument("--ssl-size", type=int, default=32, help="self-supervised student side")
    p.add_argument("--effnet-view", type=int, default=48)
    p.add_argument("--views", type=int, default=8, help="R stored views per image")
    p.add_argument("--teacher-epochs", type=int, default=12)
    p.add_argument("--sup-epochs", type=int, default=24)
    p.add_argument("--ssl-epochs", type=int, default=16)
    p.add_argument("--sup-lr", type=float, default=0.1, help="per 256 views")
    p.add_argument("--sup-warmup", type=float, default=0.0, help="supervised warm-up, in epochs")
    p.add_argument("--bn", action="store_true", help="also: val top-1 with BN statistics recomputed on single crops")
    p.add_argument("--batch", type=int, default=128, help="views per step")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="of every run (the teacher's, the store's and the students')")
    p.add_argument("--doc", type=Path, default=None, help="also write the table and plot here (docs/)")
    a = p.parse_args(argv)
    a.crops = [int(k) for k in a.crops.split(",")]
    a.spreads = [int(s) for s in a.spreads.split(",")]
    common = ["--data", a.data, "--workers", a.workers, "--device", a.device, "--seed", a.seed]
    if a.data_root:
        common += ["--data-root", a.data_root]
    a.out.mkdir(parents=True, exist_ok=True)
    if a.study == "ssl":
        table = render_study(ssl_study_rows(a, common, a.out))
        print(table)
        (a.out / "ssl_study.md").write_text(table + "\n")
        return 0
    rows = []
    if "sup" in a.variants:
        rows += sup_rows(a, common, a.out)
    if "ssl" in a.variants:
        rows += ssl_rows(a, common, a.out)
    table = render(rows, a)
    print(table)
    (a.out / "crops.md").write_text(table + "\n")
    plot(rows, a.out / "crops.png")
    if a.doc:
        a.doc.mkdir(parents=True, exist_ok=True)
        plot(rows, a.doc / "crops_ablation.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
