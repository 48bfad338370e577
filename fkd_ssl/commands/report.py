"""Render the accumulated results table (``fkd-report``; usage lines in ``eval/report.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import entry_points, parser, prepare_out_dir
from ..errors import DataError
from ..evaluation.commands import DEFAULT_RESULTS
from ..evaluation.results import load_rows, render_markdown, render_png, write_csv
from ..fileio import write_text_atomic


def build_parser():
    p = parser("Render evaluation results (latest row per model, data, protocol and k).")
    p.add_argument("--results", default=DEFAULT_RESULTS, help="results table written by the evaluators")
    p.add_argument("--out", default=None, help="output folder (default: the results table's folder)")
    p.add_argument("--metric", default="top1", choices=("top1", "top5"))
    p.add_argument("--data", default=None, help="only rows whose --data contains this text")
    p.add_argument("--model", action="append", default=None, help="only models whose label contains this (repeatable)")
    return p


def run(args: argparse.Namespace) -> int:
    """Render the results table as markdown + PNG (+ CSV) and print the markdown."""
    rows = load_rows(args.results)
    if args.data:
        rows = [r for r in rows if args.data in str(r.get("data"))]
    if args.model:
        rows = [r for r in rows if any(m in str(r.get("model")) for m in args.model)]
    if not rows:
        raise DataError(f"--results {args.results}: no rows" + (" match the filters" if args.data or args.model else ""))
    out = prepare_out_dir(args.out if args.out else Path(args.results).parent, "--out")
    md = render_markdown(rows, args.metric)
    md_path = out / "results.md"
    write_text_atomic(md_path, md)
    png = render_png(rows, out / "results.png", args.metric)
    csv_path = write_csv(rows, out / "results.csv")
    print(md)
    n_models = len({(r.get("model"), r.get("model_identity")) for r in rows})
    print(f"report: {len(rows)} rows, {n_models} models -> {md_path}, {png}, {csv_path}", flush=True)
    return 0


main, console = entry_points(__name__)
