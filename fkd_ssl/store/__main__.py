"""``python -m fkd_ssl.store verify|info|import-fkd|export-fkd ...``: :mod:`fkd_ssl.commands.store`."""

from ..commands.store import console, main  # noqa: F401 (main: what tests call in-process)

if __name__ == "__main__":
    console()
