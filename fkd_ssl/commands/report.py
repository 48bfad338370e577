"""Render the accumulated results table (``fkd-report``; usage lines in ``eval/report.py``)."""

from __future__ import annotations

from typing import Sequence

from ..cli import parser, run_main
from ..evaluation.commands import DEFAULT_RESULTS, run_report


def build_parser():
    p = parser("Render evaluation results (latest row per model, data, protocol and k).")
    p.add_argument("--results", default=DEFAULT_RESULTS, help="results table written by the evaluators")
    p.add_argument("--out", default=None, help="output folder (default: the results table's folder)")
    p.add_argument("--metric", default="top1", choices=("top1", "top5"))
    p.add_argument("--data", default=None, help="only rows whose --data contains this text")
    p.add_argument("--model", action="append", default=None, help="only models whose label contains this (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


run = run_report


def console() -> None:
    run_main(main)
