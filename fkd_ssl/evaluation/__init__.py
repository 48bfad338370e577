"""Evaluators: frozen features (cached), kNN (faiss) and linear probes, and their results table.

:mod:`.commands` is what ``eval/knn.py``, ``eval/linear_probe.py`` and ``eval/report.py`` run.
"""

from .features import (FeatureSet, FeatureSource, cache_key, eval_transform, extract_features, load_cached,
                       resolve_source, spec_eval_transform)
from .knn import KnnResult, knn_evaluate, knn_search, l2_normalize, ranked_classes, topk_accuracy, vote
from .probe import ProbeResult, fast_linear_probe, fit_logistic, stratified_holdout
from .results import append_rows, load_rows, make_row, render_markdown, render_png

__all__ = ["FeatureSet", "FeatureSource", "cache_key", "eval_transform", "extract_features", "load_cached",
           "resolve_source", "spec_eval_transform", "KnnResult", "knn_evaluate", "knn_search", "l2_normalize",
           "ranked_classes", "topk_accuracy", "vote", "ProbeResult", "fast_linear_probe", "fit_logistic",
           "stratified_holdout", "append_rows", "load_rows", "make_row", "render_markdown", "render_png"]
