"""Linear probe of frozen features: fast logistic regression on cached features, or the full protocol (``fkd-linear-probe``).

    python eval/linear_probe.py --checkpoint runs/fkd/model.safetensors --data synthetic
    python eval/linear_probe.py --checkpoint effnet-lite0 --data imagefolder:/data/imagenet --full --device cuda
    torchrun --nproc-per-node 8 eval/linear_probe.py --checkpoint ... --full --epochs 90

Flags: ``--help`` (the command is :mod:`fkd_ssl.commands.linear_probe`).
"""

from fkd_ssl.commands.linear_probe import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
