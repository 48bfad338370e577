"""Evaluation results: one JSON per evaluation, an accumulating table, and its rendering. A row (:func:`make_row`) is
one measured number with its model, data and protocol."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ConfigError, DataError
from ..fileio import atomic_path, write_text_atomic

PROTOCOLS = ("knn", "knn-majority", "linear-fast", "linear-full")
CSV_COLUMNS = ("timestamp", "model", "method", "arch", "features", "model_ref", "model_identity", "input_size", "data",
               "data_fingerprint", "n_train", "n_val", "num_classes", "protocol", "k", "T", "top1", "top5",
               "feature_dim", "seconds", "extract_seconds", "cached", "git_sha", "extra")


def make_row(*, source: dict, data: str, train: dict, val: dict, protocol: str, top1: float, top5: float,
             seconds: float, k: int | None = None, temperature: float | None = None, extract_seconds: float = 0.0,
             cached: bool = False, extra: dict | None = None) -> dict:
    """One result row; ``source`` is :meth:`FeatureSource.describe`, ``train`` / ``val`` are
    :meth:`IndexedDataset.describe` of the splits used."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    from ..cli import git_sha

    return {
        "model": source["name"], "method": source["method"], "arch": source["arch"], "features": source["output"],
        "model_ref": source["ref"], "model_identity": source["identity"], "input_size": source["input_size"],
        "data": data, "data_fingerprint": f"{train['fingerprint']}/{val['fingerprint']}",
        "n_train": train["num_images"], "n_val": val["num_images"], "num_classes": train["num_classes"],
        "protocol": protocol, "k": k, "T": temperature, "top1": round(float(top1), 4), "top5": round(float(top5), 4),
        "feature_dim": source["feature_dim"], "seconds": round(float(seconds), 3),
        "extract_seconds": round(float(extract_seconds), 3), "cached": bool(cached), "git_sha": git_sha(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "extra": extra or {},
    }


def _write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return _write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def _csv_text(rows: Iterable[dict], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows({**r, "extra": json.dumps(r.get("extra", {}))} for r in rows)
    return buf.getvalue()


def append_rows(table: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Append rows to the results table (``.csv``: CSV with a header; else JSON lines) in a single ``write``."""
    table = Path(table)
    try:
        table.parent.mkdir(parents=True, exist_ok=True)
        if table.suffix == ".csv":
            text = _csv_text(rows, header=not table.exists() or table.stat().st_size == 0)
        else:
            text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        if table.exists() and table.stat().st_size > 0:
            with open(table, "rb") as f:  # a writer killed mid-line: start on a fresh line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
        with open(table, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise ConfigError(f"--results {table}: cannot write it ({e.strerror})") from e
    return table


def _from_csv(rec: dict) -> dict:
    out: dict = dict(rec)
    for cast, keys in ((int, ("n_train", "n_val", "num_classes", "k", "feature_dim", "input_size")),
                       (float, ("T", "top1", "top5", "seconds", "extract_seconds"))):
        out.update({key: cast(rec[key]) if rec.get(key) not in (None, "") else None for key in keys})
    out["cached"] = rec.get("cached") == "True"
    out["extra"] = json.loads(rec["extra"]) if rec.get("extra") else {}
    return out


def load_rows(table: str | os.PathLike) -> list[dict]:
    """All rows of a results table; malformed lines (e.g. a run killed mid-write) are skipped with a warning."""
    table = Path(table)
    if not table.is_file():
        raise DataError(f"--results {table} does not exist (run eval/knn.py or eval/linear_probe.py first)")
    text = table.read_bytes().decode("utf-8", errors="replace")  # a binary file is all malformed rows
    rows: list[dict] = []
    bad = 0
    if table.suffix == ".csv":
        for rec in csv.DictReader(io.StringIO(text)):
            try:
                rows.append(_from_csv(rec))
            except (ValueError, KeyError, TypeError, json.JSONDecodeError):
                bad += 1
    else:
        for line in filter(str.strip, text.splitlines()):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict) and {"model", "protocol", "top1"} <= rec.keys():
                rows.append(rec)
            else:
                bad += 1
    if bad:
        print(f"warning: skipped {bad} malformed row(s) in {table}", file=sys.stderr)
    return rows


def column_label(row: dict) -> str:
    """The table column of a row: ``kNN k=20``, ``1-NN``, ``kNN-maj k=5``, ``linear (fast)``..."""
    p, k = row["protocol"], row.get("k")
    if p == "knn":
        return f"kNN k={k}"
    if p == "knn-majority":
        return "1-NN" if k == 1 else f"kNN-maj k={k}"
    return {"linear-fast": "linear (fast)", "linear-full": "linear (full)"}.get(p, p)


def latest(rows: Iterable[dict]) -> list[dict]:
    """The last row of every (model, output, data, protocol, k, T), in first-seen order."""
    keep: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("model_identity"), r.get("model"), r.get("features"), r.get("data_fingerprint"),
               r["protocol"], r.get("k"), r.get("T"))
        keep[key] = r  # a later row replaces an earlier one and keeps its place
    return list(keep.values())


def pivot(rows: Sequence[dict], metric: str = "top1") -> list[tuple[str, list[str], list[tuple[dict, dict[str, float]]]]]:
    """Group the latest rows by dataset: [(data label, columns, [(model row, {column: value})])]."""
    if metric not in ("top1", "top5"):
        raise ConfigError(f"--metric {metric!r}: top1 or top5")
    groups: dict[tuple, dict] = {}
    for r in latest(rows):
        g = groups.setdefault((r["data"], r.get("data_fingerprint")), {"models": {}, "columns": {}})
        label = column_label(r)  # ordered kNN by k, then majority votes by k, then the rest
        g["columns"][label] = ({"knn": 0, "knn-majority": 1}.get(r["protocol"], 2), r.get("k") or 0, label)
        mkey = (r.get("model"), r.get("model_identity"), r.get("features"))
        entry = g["models"].setdefault(mkey, (r, {}))
        entry[1][label] = float(r[metric])
    out = []
    for (data, fp), g in groups.items():
        first = next(iter(g["models"].values()))[0]
        title = f"{data} ({first.get('n_train')} train / {first.get('n_val')} val, {first.get('num_classes')} classes, {fp})"
        out.append((title, sorted(g["columns"], key=g["columns"].get), list(g["models"].values())))
    return out


def render_markdown(rows: Sequence[dict], metric: str = "top1") -> str:
    """Side-by-side markdown tables (one per dataset) of ``metric`` in percent."""
    parts = []
    for title, columns, models in pivot(rows, metric):
        parts.append(f"### {title}\n")
        parts.append(f"{metric} accuracy (%), latest run of each model and protocol.\n")
        parts.append("| model | method | dim | " + " | ".join(columns) + " |")
        parts.append("|---|---|---:|" + "---:|" * len(columns))
        for row, values in models:
            cells = [f"{values[c]:.1f}" if c in values else "–" for c in columns]
            parts.append(f"| {row['model']} | {row.get('method', '')} | {row.get('feature_dim', '')} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def render_png(rows: Sequence[dict], path: str | os.PathLike, metric: str = "top1") -> Path:
    """Grouped bar charts (one panel per dataset): protocols on x, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = pivot(rows, metric)
    if not groups:
        raise DataError("no results to plot")
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 1.6 * max(len(g[1]) for g in groups) + 3), 4.2 * len(groups)),
                             squeeze=False)
    for ax, (title, columns, models) in zip(axes[:, 0], groups):
        width = 0.8 / max(len(models), 1)
        for j, (row, values) in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(columns))]
            ys = [values.get(c, float("nan")) for c in columns]
            bars = ax.bar(xs, ys, width, label=row["model"])
            for b, y in zip(bars, ys):
                if y == y:  # not NaN
                    ax.annotate(f"{y:.1f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """All rows as CSV (for spreadsheets), written atomically."""
    return _write_text(path, _csv_text(rows, header=True))
