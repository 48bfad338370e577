"""The quick start's pipeline (``fkd-quickstart``): its stages, their ledger and the summary.

A *stage* is one run of a command's own ``main(argv)`` in this process, so it does exactly what its
printed command does; ``<out>/pipeline.json`` records finished stages, which a rerun skips."""

from __future__ import annotations

import csv
import importlib
import io
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from .commands import script_name
from .errors import ConfigError
from .fileio import atomic_path, write_text_atomic


@dataclass(frozen=True)
class Sizes:
    """Every size the quick start uses: ``FULL`` (2,000 train / 1,000 val images of the built-in
    synthetic set, at most 15 minutes on 2 CPU cores) and ``FAST`` (about 1 minute; what CI runs)."""

    data: str
    student_arch: str
    stem: str
    student_size: int  # student input side (FKD: students may train at a lower resolution)
    effnet_view: int  # side of the views the EfficientNet-Lite teachers see
    views_per_image: int  # R
    crops: int  # K, in both variants
    ssl_epochs: int  # views per image (K views of each decoded image per pass)
    sup_epochs: int
    sup_lr: float  # per 256 views
    batch: int  # samples (views, or images for MoCo) per step
    queue: int  # MoCo alone's queue; the SSL students' is 8x
    head_hidden: int
    label_map_size: int  # side the ReLabel teacher sees the whole image at (ReLabel: above its training size)
    pixels: int  # side of the raw-pixel baseline


FULL = Sizes(data="synthetic:train=2000", student_arch="resnet10t", stem="default", student_size=32, effnet_view=48,
             views_per_image=12, crops=4, ssl_epochs=12, sup_epochs=16, sup_lr=0.1, batch=128, queue=512,
             head_hidden=512, label_map_size=96, pixels=32)
FAST = Sizes(data="synthetic:train=300,val=150,size=32", student_arch="resnet10t", stem="default", student_size=32,
             effnet_view=48, views_per_image=4, crops=2, ssl_epochs=2, sup_epochs=2, sup_lr=0.1, batch=32, queue=64,
             head_hidden=64, label_map_size=64, pixels=16)

#: the models the claims of :func:`claims` compare
FKD_SSL, ONLINE, MOCO_ALONE = "FKD student (EffNet store)", "online-teacher student (EffNet)", "MoCo alone (student arch, FKD's time)"
CLASSIFIER, FKD_SUP, PLAIN, RELABEL = "classifier teacher (EfficientNet-Lite0 + linear probe)", "FKD student (soft labels)", "plain-label student", "ReLabel student"
EFFNET, RANDOM = "EfficientNet-Lite0 teacher (ImageNet)", "random init"


@dataclass
class Stage:
    """One command run. ``model`` / ``store``: what it produces (None if nothing of that kind)."""

    name: str
    command: str  # module of fkd_ssl.commands
    argv: list[str]
    variant: str = ""  # "ssl" / "sup" / "reference" (a teacher not trained here) / "baseline"
    teacher: str = ""
    model: Path | None = None
    store: Path | None = None
    argv_fn: Callable[[dict], list[str]] | None = field(default=None, repr=False)  # extra args from earlier stages

    def command_line(self, extra: list[str] | None = None) -> str:
        """The console-script command a user runs to do this stage."""
        return " ".join([script_name(self.command), *map(shlex.quote, self.argv + (extra or []))])


def plan(out: Path, sizes: Sizes, data_root: str, device: str, workers: int, seed: int = 0,
         data: str | None = None) -> list[Stage]:
    """The stages, in order (see the module docstring)."""
    z = sizes
    common = ["--data", data or z.data, "--data-root", data_root, "--device", device, "--seed", str(seed),
              "--workers", str(workers)]
    run = out / "runs"
    t_cls, s_eff, s_cls, lmap = run / "classifier", run / "store-effnet", run / "store-classifier", run / "labelmap"

    def trains(name: str, command: str, argv: list[str], folder: Path, variant: str, teacher: str,
               store: Path | None = None, argv_fn=None) -> Stage:
        return Stage(name, command, [*argv, "--out", str(folder)], variant, teacher, model=folder / "model.safetensors",
                     store=store, argv_fn=argv_fn)

    def fills(name: str, command: str, argv: list[str], folder: Path, variant: str, teacher: str) -> Stage:
        return Stage(name, command, [*argv, "--out", str(folder)], variant, teacher, store=folder)

    gen = [*common, "--views-per-image", str(z.views_per_image)]
    student = [*common, "--arch", z.student_arch, "--stem", z.stem, "--input-size", str(z.student_size),
               "--batch-size", str(z.batch)]
    # distill_ssl's own defaults (AdamW, docs/distill.md "Choosing the defaults"), K = crops
    ssl_student = [*student, "--crops-per-image", str(z.crops), "--epochs", str(z.ssl_epochs), "--queue-size",
                   str(z.queue * 8), "--head-hidden", str(z.head_hidden), "--store", str(s_eff)]
    # equal views in every supervised mode: FKD replays K stored crops per decoded image, the
    # conventional pipelines (plain labels, ReLabel) decode the image for every crop
    sup_student = [*student, "--epochs", str(z.sup_epochs), "--lr", f"{z.sup_lr:g}"]
    t_cls_model = str(t_cls / "model.safetensors")
    stages = [
        fills("store: EfficientNet-Lite0", "gen_targets",
              [*gen, "--teacher", "effnet-lite0", "--target", "feature", "--view-size", str(z.effnet_view),
               "--batch-size", "128"], s_eff, "ssl", "effnet-lite0"),
        trains(FKD_SSL, "distill_ssl", ssl_student, run / "fkd-effnet", "ssl", "effnet-lite0", s_eff),
        trains(ONLINE, "distill_ssl", [*ssl_student, "--online-teacher", "effnet-lite0"], run / "online-effnet", "ssl",
               "effnet-lite0"),
        trains(MOCO_ALONE, "pretrain_teacher",
               [*student, "--queue-size", str(z.queue), "--proj-hidden", str(z.head_hidden), "--epochs", "100"],
               run / "moco-alone", "ssl", "none", argv_fn=_same_time_as(run / "fkd-effnet")),
        Stage(CLASSIFIER, "linear_probe", [*common, "--checkpoint", "effnet-lite0", "--input-size", str(z.effnet_view),
                                           "--cache-dir", str(out / "features"), "--results", str(out / "results.jsonl"),
                                           "--name", EFFNET, "--export-classifier", t_cls_model, "--out", str(t_cls)],
              "sup", "effnet-lite0"),
        fills("store: classifier soft labels", "gen_targets", [*gen, "--teacher", t_cls_model], s_cls, "sup",
              "classifier"),
        fills("ReLabel label map", "gen_label_map",
              [*common, "--teacher", t_cls_model, "--input-size", str(z.label_map_size)], lmap, "sup", "classifier"),
        trains(FKD_SUP, "distill_sup", [*sup_student, "--store", str(s_cls), "--crops-per-image", str(z.crops)],
               run / "sup-fkd", "sup", "classifier", s_cls),
        trains(PLAIN, "distill_sup", [*sup_student, "--targets", "hard"], run / "sup-plain", "sup", "none"),
        trains(RELABEL, "distill_sup", [*sup_student, "--targets", "relabel", "--label-map", str(lmap)],
               run / "sup-relabel", "sup", "classifier", lmap),
    ]
    return stages + eval_stages(out, stages, common, z)


def _same_time_as(run_dir: Path) -> Callable[[dict], list[str]]:
    """``--max-minutes`` = the training time of the run in ``run_dir`` (read from its model.json)."""
    def extra(_: dict) -> list[str]:
        meta = json.loads((run_dir / "model.json").read_text())
        return ["--max-minutes", f"{max(float(meta['train_seconds']), 1.0) / 60:.4f}"]
    return extra


def eval_stages(out: Path, stages: list[Stage], common: list[str], z: Sizes) -> list[Stage]:
    """kNN + fast linear probe of every model, plus random-init and raw-pixel baselines."""
    ev = [*common, "--cache-dir", str(out / "features"), "--results", str(out / "results.jsonl")]
    refs = [(s.name, str(s.model), [], s.variant, s.teacher) for s in stages if s.model is not None]
    # the ImageNet teacher as it is (its features at the size its store's views had), then the baselines
    refs += [(EFFNET, "effnet-lite0", ["--input-size", str(z.effnet_view)],
              "reference", "effnet-lite0"),
             (RANDOM, f"random:{z.student_arch}",
              ["--stem", z.stem, "--input-size", str(z.student_size)], "baseline", ""),
             ("raw pixels", f"pixels:{z.pixels}", [], "baseline", "")]
    evals = []
    for name, ref, extra, variant, teacher in refs:
        for command in ("knn", "linear_probe"):
            evals.append(Stage(f"{'kNN' if command == 'knn' else 'linear probe'}: {name}", command,
                               [*ev, "--checkpoint", ref, "--name", name, *extra,
                                "--out", str(out / "eval" / _slug(name))], variant, teacher))
    return evals


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


# ----------------------------------------------------------------------------- running


class Ledger:
    """``<out>/pipeline.json``: which stages finished, in how many seconds, with which command."""

    def __init__(self, path: Path, write: bool = True):
        self.path, self.write = path, write  # write: False on torchrun ranks other than 0
        self.done: dict[str, dict] = json.loads(path.read_text())["stages"] if path.exists() else {}

    def record(self, stage: Stage, seconds: float, command: str) -> None:
        self.done[stage.name] = {"seconds": round(seconds, 2), "command": command}
        if self.write:
            write_text_atomic(self.path, json.dumps({"stages": self.done}, indent=1) + "\n")


def run_stages(stages: list[Stage], ledger: Ledger, log: Callable[[str], None] = print,
               sync: Callable[[], None] = lambda: None) -> None:
    """Run every stage not yet in the ledger, in order; a failing stage stops the pipeline.
    ``sync`` runs after each stage (a barrier under torchrun: a stage's outputs, written by rank
    0, exist before any rank starts the next one)."""
    for i, stage in enumerate(stages, 1):
        if stage.name in ledger.done:
            log(f"[{i}/{len(stages)}] {stage.name}: done ({ledger.done[stage.name]['seconds']:.0f} s)")
            continue
        extra = stage.argv_fn(ledger.done) if stage.argv_fn else []
        command = stage.command_line(extra)
        log(f"[{i}/{len(stages)}] {stage.name}\n  $ {command}")
        t0 = time.time()
        code = importlib.import_module(f"fkd_ssl.commands.{stage.command}").main(stage.argv + extra)
        if code:
            raise ConfigError(f"stage '{stage.name}' failed (exit {code}): {command}")
        sync()
        ledger.record(stage, time.time() - t0, command)


# ----------------------------------------------------------------------------- the summary


def _last_metric(run_dir: Path, key: str) -> float | None:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return next((r[key] for r in reversed(rows) if key in r), None)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summary_rows(out: Path, stages: list[Stage]) -> list[dict]:
    """One row per model: variant, teacher, kNN k=20 / linear top-1, train time, views/s, store size."""
    from .evaluation.results import latest, load_rows

    results = latest(load_rows(out / "results.jsonl")) if (out / "results.jsonl").exists() else []
    acc: dict[tuple[str, str], float] = {}
    for r in results:
        if r["protocol"] == "knn" and r.get("k") == 20:
            acc[(r["model"], "knn")] = r["top1"]
        elif r["protocol"] == "linear-fast":
            acc[(r["model"], "linear")] = r["top1"]
    rows = []
    named = [(s.name, s) for s in stages if s.model is not None]
    trained = {n for n, _ in named}
    evaluated = {s.name.split(": ", 1)[1]: s for s in stages if s.name.startswith(("kNN: ", "linear probe: "))}
    z_names = [n for n in evaluated if n not in trained]  # the references and baselines, in plan order
    z_names += sorted({r["model"] for r in results} - trained - set(z_names))  # results of other runs
    for name, s in named + [(n, None) for n in z_names]:
        e = s or evaluated.get(name)
        row = {"model": name, "variant": (e.variant or "baseline") if e else "baseline",
               "teacher": e.teacher if e else "",
               "knn_top1": acc.get((name, "knn")), "linear_top1": acc.get((name, "linear")), "val_top1": None,
               "train_s": None, "views_per_s": None, "store_mb": None}
        if s is not None and s.model is not None and s.model.with_suffix(".json").exists():
            meta = json.loads(s.model.with_suffix(".json").read_text())
            row["train_s"] = round(float(meta.get("train_seconds", 0.0)), 1)
            vps = _last_metric(s.model.parent, "views_per_s")
            row["views_per_s"] = round(vps, 1) if vps else None
            row["val_top1"] = _last_metric(s.model.parent, "val_top1")
        if s is not None and s.store is not None and s.store.exists() and "student" in s.name.lower():
            row["store_mb"] = round(_dir_bytes(s.store) / 1e6, 2)
        rows.append(row)
    return rows


COLUMNS = ("model", "variant", "teacher", "knn_top1", "linear_top1", "val_top1", "train_s", "views_per_s", "store_mb")
HEADERS = ("model", "variant", "teacher", "kNN top-1 (k=20)", "linear top-1", "val top-1", "train time (s)",
           "views/s", "store (MB)")


def render_summary(rows: list[dict]) -> str:
    """The markdown table of :func:`summary_rows`."""
    def fmt(v):
        return "—" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class Claim(NamedTuple):
    """One of the quick start's claims, with the numbers it rests on."""

    text: str
    numbers: str
    holds: bool | None  # None: a number is missing


def claims(rows: list[dict], z: Sizes) -> list[Claim]:
    """What the quick start claims for FKD (issue 13), each judged on this run's table."""
    by = {r["model"]: r for r in rows}

    def get(model: str, key: str) -> float | None:
        return by.get(model, {}).get(key)

    def claim(text: str, numbers: Callable[..., str], test: Callable[..., bool], *values) -> Claim:
        if any(v is None for v in values):
            return Claim(text, "missing: " + ", ".join(map(str, values)), None)
        return Claim(text, numbers(*values), bool(test(*values)))

    def closes(student: str, teacher: str) -> Claim:
        return claim(f"{student} closes at least half of the kNN distance from random init to its teacher",
                     lambda s, r, t: f"random {r:.1f} -> student {s:.1f} -> teacher {t:.1f}: "
                                     f"{100 * (s - r) / max(t - r, 1e-9):.0f}%",
                     lambda s, r, t: t > r and (s - r) >= 0.5 * (t - r),
                     get(student, "knn_top1"), get(RANDOM, "knn_top1"), get(teacher, "knn_top1"))

    per_epoch = {m: (get(m, "train_s") / z.sup_epochs if get(m, "train_s") else None) for m in (FKD_SUP, PLAIN, RELABEL)}
    return [
        claim("SSL: the FKD student beats MoCo alone (same arch, FKD's training time) by >= 5 kNN points",
              lambda f, m: f"{f:.1f} vs {m:.1f} ({f - m:+.1f})", lambda f, m: f - m >= 5,
              get(FKD_SSL, "knn_top1"), get(MOCO_ALONE, "knn_top1")),
        claim("SSL: the FKD student is within 1.5 kNN points of the online-teacher student at <= 0.7x its time",
              lambda f, o, tf, to: f"{f:.1f} vs {o:.1f} ({f - o:+.1f}); {tf:.0f} s vs {to:.0f} s ({tf / to:.2f}x)",
              lambda f, o, tf, to: f >= o - 1.5 and tf <= 0.7 * to,
              get(FKD_SSL, "knn_top1"), get(ONLINE, "knn_top1"), get(FKD_SSL, "train_s"), get(ONLINE, "train_s")),
        claim("supervised: the FKD student beats the plain-label student by >= 2 val top-1 points and is at least "
              "as good as the ReLabel student, at equal views",
              lambda f, p, r: f"{f:.1f} vs plain {p:.1f} ({f - p:+.1f}), ReLabel {r:.1f} ({f - r:+.1f})",
              lambda f, p, r: f - p >= 2 and f >= r,
              get(FKD_SUP, "val_top1"), get(PLAIN, "val_top1"), get(RELABEL, "val_top1")),
        claim("supervised: seconds per epoch FKD < plain < ReLabel",
              lambda f, p, r: f"{f:.2f} < {p:.2f} < {r:.2f} s", lambda f, p, r: f < p < r,
              per_epoch[FKD_SUP], per_epoch[PLAIN], per_epoch[RELABEL]),
        closes(FKD_SSL, EFFNET),
        closes(FKD_SUP, EFFNET),  # the classifier teacher's backbone: its features are EfficientNet-Lite0's
    ]


def render_claims(found: list[Claim]) -> str:
    """The claims as markdown lines: whether each holds, and its numbers."""
    word = {True: "holds", False: "does NOT hold", None: "not measured"}
    return "\n".join(f"- **{word[c.holds]}**: {c.text} — {c.numbers}" for c in found) + "\n"


def plot_summary(rows: list[dict], path: Path) -> Path:
    """Accuracy (kNN and linear top-1) vs training wall time: a point per trained model; the models not
    trained here are reference lines (listed at the top when far above every trained model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["train_s"] is not None]
    refs = [r for r in rows if r["train_s"] is None]
    colours = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, title in ((axes[0], "knn_top1", "kNN top-1 (k=20)"), (axes[1], "linear_top1", "linear top-1")):
        ys = [r[key] for r in trained if r[key] is not None]
        top = (max(ys) + 6) if ys else 100.0
        for n, r in enumerate(trained):
            if r[key] is not None:
                ax.scatter(r["train_s"], r[key], s=48, zorder=3, color=colours[n % len(colours)],
                           marker={"ssl": "o", "sup": "s"}.get(r["variant"], "^"), label=r["model"])
        above = []
        for r in refs:
            if r[key] is None:
                continue
            if r[key] > top:
                above.append(f"{r['model']}: {r[key]:.1f} (above)")
                continue
            ys.append(r[key])
            ax.axhline(r[key], ls=":", lw=1, color="grey")
            ax.text(0.01, r[key], f"{r['model']} ({r[key]:.1f})", transform=ax.get_yaxis_transform(), fontsize=7,
                    color="dimgrey", va="bottom")
        if above:
            ax.text(0.01, 0.98, "\n".join(above), transform=ax.transAxes, fontsize=7, color="dimgrey", va="top")
        ax.set_ylim(max(0.0, min(ys, default=0.0) - 3), top + (4 if above else 0))
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title + "  (o: SSL variant, s: supervised)", fontsize=9)
        ax.grid(alpha=0.3)
    # every trained model, also one with a linear but no kNN value (its two points look alike)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * ((len(legend) + 2) // 3), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def summarize(out: Path, stages: list[Stage], ledger: Ledger, header: str, sizes: Sizes) -> str:
    """Write ``report.md``, ``summary.csv`` and ``accuracy_vs_time.png`` in ``out``; returns the markdown."""
    rows = summary_rows(out, stages)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "summary.csv", table.getvalue())
    plot_summary(rows, out / "accuracy_vs_time.png")
    total = sum(v["seconds"] for v in ledger.done.values())
    md = [header, "", render_summary(rows), f"Pipeline wall time: {total / 60:.1f} min over {len(ledger.done)} stages "
          "(first run of each stage).", "", "## Claims", "", render_claims(claims(rows, sizes)),
          "![accuracy vs training time](accuracy_vs_time.png)", "",
          "## Commands", ""]
    md += [f"- {name}: `{v['command']}` ({v['seconds']:.0f} s)" for name, v in ledger.done.items()]
    text = "\n".join(md) + "\n"
    write_text_atomic(out / "report.md", text)
    return text
