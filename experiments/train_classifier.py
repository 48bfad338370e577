"""Train a classifier teacher on --data's own labels, for supervised FKD (``fkd-train-classifier``).

    python experiments/train_classifier.py                       # resnet18, 64 px -> runs/classifier-synthetic
    python experiments/train_classifier.py --init runs/teacher-synthetic/model.safetensors   # fine-tune

Takes every flag of distill_sup.py.  Flags: ``--help`` (the command is
:mod:`fkd_ssl.commands.train_classifier`).
"""

from fkd_ssl.commands.train_classifier import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
