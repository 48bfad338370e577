"""Train a classifier student on stored soft labels (supervised FKD), or a baseline (``fkd-distill-sup``).

    python experiments/distill_sup.py --store runs/store-synthetic-classifier-synthetic   # FKD student
    python experiments/distill_sup.py --targets hard                          # plain labels
    python experiments/distill_sup.py --targets relabel --label-map runs/labelmap-synthetic-...
    python experiments/distill_sup.py --targets online --teacher runs/classifier-synthetic/model.safetensors
    torchrun --standalone --nproc_per_node=N experiments/distill_sup.py ...

--epochs counts views per image, --batch-size views per step, --lr is per 256 views (FKD's
units, README "Common flags").  Flags: ``--help`` (the command is :mod:`fkd_ssl.commands.distill_sup`).
"""

from fkd_ssl.commands.distill_sup import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
