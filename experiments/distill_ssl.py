"""Distil a self-supervised teacher into a student from a target store (FKD), or an online teacher (``fkd-distill-ssl``).

    python experiments/distill_ssl.py                            # the store gen_targets.py wrote for --data
    python experiments/distill_ssl.py --store runs/store-synthetic-teacher-synthetic --loss soft-ce
    python experiments/distill_ssl.py --online-teacher runs/teacher-synthetic/model.safetensors   # vanilla KD
    torchrun --nproc_per_node=N experiments/distill_ssl.py ...

--epochs counts views per image, --batch-size views per step, --lr is per 256 views (FKD's
units, README "Common flags").  Flags: ``--help`` (the command is :mod:`fkd_ssl.commands.distill_ssl`).
"""

from fkd_ssl.commands.distill_ssl import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
