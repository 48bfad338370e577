"""Every entry point of the project, one module per command.

A command module has ``build_parser()``, ``run(args)``, maybe ``check(parser, args)``, and ``main(argv=None)`` and
``console()`` from :func:`fkd_ssl.cli.entry_points`; ``experiments/`` and ``eval/`` hold shims.
"""

#: every command module; its console script is ``fkd-<name with dashes>`` (pyproject.toml)
NAMES = ("pretrain_teacher", "gen_targets", "distill_ssl", "distill_sup", "train_classifier", "gen_label_map",
         "quickstart", "knn", "linear_probe", "report", "store")


def script_name(name: str) -> str:
    """The console script of command ``name`` (``distill_sup`` -> ``fkd-distill-sup``)."""
    return "fkd-" + name.replace("_", "-")
