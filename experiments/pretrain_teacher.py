"""Pretrain a self-supervised teacher (MoCo v2 or SimSiam) on --data (``fkd-pretrain-teacher``).

    python experiments/pretrain_teacher.py                       # MoCo v2 resnet10t on the synthetic set
    python experiments/pretrain_teacher.py --method simsiam --data imagefolder:/data/imagenet --device cuda
    torchrun --nproc_per_node=8 experiments/pretrain_teacher.py --data imagefolder:/data/imagenet ...

Flags and their units: ``--help`` (the command is :mod:`fkd_ssl.commands.pretrain_teacher`).
"""

from fkd_ssl.commands.pretrain_teacher import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
