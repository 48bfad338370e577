"""Train (or fine-tune with ``--init``) a classifier on --data's own labels: a teacher for supervised FKD.

The same training loop and flags as ``experiments/distill_sup.py --targets hard`` (plain labels
on fresh RandomResizedCrop views), with a teacher's defaults: ResNet-18 at 64 px, label
smoothing 0.1, output ``runs/classifier-<data>``.  The checkpoint is a project checkpoint
with a classifier, so ``gen_targets.py --teacher runs/classifier-<data>/model.safetensors``
stores its top-k soft labels and ``gen_label_map.py`` its ReLabel label map.  Any flag of
distill_sup.py may be given (``python experiments/distill_sup.py --help``); rerunning the
same command resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill_sup  # noqa: E402  (the sibling script)

from fkd_ssl import cli  # noqa: E402

#: a classifier teacher's defaults; flags given on the command line win (argparse: the last one counts)
TEACHER_DEFAULTS = ["--targets", "hard", "--arch", "resnet18", "--input-size", "64", "--epochs", "16",
                    "--label-smoothing", "0.1"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--targets" or a.startswith("--targets=") for a in argv):
        raise SystemExit("error: train_classifier.py always trains on the dataset's labels; for soft-label students "
                         "use experiments/distill_sup.py --targets ...")
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
    args = distill_sup.parse(TEACHER_DEFAULTS + argv)
    if args.out is None:
        argv += ["--out", str(cli.default_run_dir("classifier", args.data))]
    return distill_sup.main(TEACHER_DEFAULTS + argv)


if __name__ == "__main__":
    cli.run_main(main)
