"""Train (or fine-tune with ``--init``) a classifier on --data's own labels: a teacher for supervised FKD.

The loop and flags of ``fkd-distill-sup --targets hard`` with a teacher's defaults (ResNet-18 at 64 px, 16 epochs,
label smoothing 0.1, output ``runs/classifier-<data>``).  Rerunning the same command resumes.
"""

from __future__ import annotations

import sys

from .. import cli
from . import distill_sup

#: a classifier teacher's defaults; flags given on the command line win
TEACHER_DEFAULTS = dict(targets="hard", arch="resnet18", input_size=64, epochs=16, label_smoothing=0.1)


def build_parser():
    p = distill_sup.build_parser(__doc__)
    p.set_defaults(**TEACHER_DEFAULTS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if any(a == "--targets" or a.startswith("--targets=") for a in argv):
        p.error("train_classifier always trains on the dataset's labels; for soft-label students use "
                "fkd-distill-sup --targets ...")
    args = p.parse_args(argv)
    distill_sup.check(p, args)
    return run(args)


def run(args) -> int:
    args.out = args.out or str(cli.default_run_dir("classifier", args.data))
    return distill_sup.run(args)


def console() -> None:
    cli.run_main(main)
