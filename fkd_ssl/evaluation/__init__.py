"""Evaluators: frozen features (cached), kNN (faiss) and linear probes, and their results table.

:mod:`.commands` is what ``eval/knn.py``, ``eval/linear_probe.py`` and ``eval/report.py`` run.
"""
