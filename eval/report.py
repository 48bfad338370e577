"""Render the accumulated results table side by side: markdown, a PNG bar chart and a CSV (``fkd-report``).

    python eval/report.py                      # runs/results.jsonl -> runs/results.{md,png,csv}
    python eval/report.py --data synthetic --metric top5 --out docs/

Flags: ``--help`` (the command is :mod:`fkd_ssl.commands.report`).
"""

from fkd_ssl.commands.report import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
