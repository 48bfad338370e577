"""Every entry point of the project, one module per command.

A command module has ``build_parser()`` (its flags), ``run(args)`` (the work, returning an
exit code), ``main(argv=None)`` (parse, check, run: what tests and the quick start call) and
``console()`` (the console script: ``main`` behind :func:`fkd_ssl.cli.run_main`'s one-line
errors).  The files under ``experiments/`` and ``eval/`` are shims that call ``console()``.
"""

#: every command module; its console script is ``fkd-<name with dashes>`` (pyproject.toml)
NAMES = ("pretrain_teacher", "gen_targets", "distill_ssl", "distill_sup", "train_classifier", "gen_label_map",
         "quickstart", "knn", "linear_probe", "report", "store")


def script_name(name: str) -> str:
    """The console script of command ``name`` (``distill_sup`` -> ``fkd-distill-sup``)."""
    return "fkd-" + name.replace("_", "-")
