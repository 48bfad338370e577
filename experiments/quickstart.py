"""The whole FKD pipeline in one command, on the built-in synthetic set, on CPU (``fkd-quickstart``).

    python experiments/quickstart.py --fast                      # about 1.5 minutes on 2 cores
    python experiments/quickstart.py                             # the full quick start
    torchrun --standalone --nproc_per_node=2 experiments/quickstart.py --fast

Flags: ``--help`` (the command is :mod:`fkd_ssl.commands.quickstart`).
"""

from fkd_ssl.commands.quickstart import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
