"""Run a teacher once over R random views of every training image and store its targets (``fkd-gen-targets``).

    python experiments/gen_targets.py                            # the teacher pretrain_teacher.py wrote
    python experiments/gen_targets.py --teacher effnet-lite0 --target feature --view-size 64
    python experiments/gen_targets.py --teacher runs/classifier-synthetic/model.safetensors   # top-k soft labels
    torchrun --standalone --nproc_per_node=N experiments/gen_targets.py ...

Flags: ``--help`` (the command is :mod:`fkd_ssl.commands.gen_targets`).
"""

from fkd_ssl.commands.gen_targets import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
