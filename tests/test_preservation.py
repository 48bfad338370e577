"""Behaviour preserved across refactors: fixed-seed tiny runs of the pipeline's commands give the
same stores, loss curves and weights as the code did when the references were recorded (commit
7438c11, before the commands moved into ``fkd_ssl/commands/``; the stores' references since issue 14's
compact records: checksums of the view parameters and decoded targets they give back, recorded with
the float32-geometry format just before it changed).

Floats are compared with a relative tolerance of 1e-4 so the references survive another CPU's
vector instructions; any change of what is computed (another view, order, loss or schedule) moves
them by far more.  The stores' parameters and decoded targets are compared bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import TINY, run_script

SMALL = ["--data", TINY, "--arch", "resnet10t", "--stem", "small", "--workers", "0", "--device", "cpu", "--seed", "3"]

#: what each run produced at the reference commit (regenerate: cd tests; python test_preservation.py DATA_ROOT OUT)
REFERENCE: dict = {'classifier': {'loss': [2.3496984004974366, 2.1912841796875],
                'weights': [8491.370317623168, 124.12013449063224, 130.17470949168964]},
 'distill_ssl': {'loss': [3.3415423393249513, 4.159937715530395],
                 'weights': [8517.072353269, -32.7380754171089, 91.97140273714142]},
 'distill_sup': {'loss': [2.332498788833618, 2.317253017425537],
                 'weights': [8430.459052386788, 128.2177422274057, 129.6104516758114]},
 'relabel': {'loss': [2.3386818408966064, 2.3234830856323243],
             'weights': [8436.153401803436, 127.79605319508137, 130.59213807346427]},
 'soft_store': {'params': '7b26c690c7edbc830fe0e0355fa5ab848326d845884d00d78797511ad40db93e',
                'targets': 'd66310d2b7d8ab8250988b1477f33c8547ba3ae56b596292a3553e5116573146'},
 'store': {'params': '5e855ae0866e2251b20e14f20e764a7ddcb9af147e8f87d882dab991a6ee5e62',
           'targets': 'a7d68029471b1bb1e761244a2f6d8bf4480c312f8aba9f2d36d1f9633634cbb6'},
 'teacher': {'loss': [2.3409794330596925, 2.946074056625366],
             'weights': [12498.286588275, -17.539901465621742, 133.8632659478549]}}


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def _weights(run: Path) -> list[float]:
    """Checksums of the exported model: the sum of squares of all its tensors and two fixed random
    projections of them in name order (any changed, moved or renamed weight changes them)."""
    tensors = load_file(str(run / "model.safetensors"))
    flat = np.concatenate([tensors[n].astype(np.float64).ravel() for n in sorted(tensors)])
    proj = np.random.default_rng(0).standard_normal((2, flat.size))
    return [float(flat @ flat), *map(float, proj @ flat)]


def _records_sha(store: Path) -> dict[str, str]:
    """sha256 of every view's parameters and decoded target (float32), as the students read them:
    the store's bytes may change with its format, what it gives back may not."""
    from fkd_ssl.store import TargetStore

    s = TargetStore.open(store)
    i = np.repeat(s.valid_indices(), s.views_per_image)
    params, targets = s.read(i, np.tile(np.arange(s.views_per_image), len(s.valid_indices())))
    return {k: hashlib.sha256(np.ascontiguousarray(a, "<f4").tobytes()).hexdigest()
            for k, a in (("params", params), ("targets", targets))}


def _run(script: str, *args: str) -> None:
    proc = run_script(script, *args)
    assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"


def produce(root: Path, data_root: Path) -> dict:
    """Run the tiny pipeline under ``root``; returns what it produced."""
    dr = ["--data-root", str(data_root)]
    got: dict = {}
    teacher, store, ssl = root / "teacher", root / "store", root / "ssl"
    _run("experiments/pretrain_teacher.py", *SMALL, *dr, "--out", str(teacher), "--input-size", "32",
         "--epochs", "2", "--batch-size", "8", "--queue-size", "16", "--proj-hidden", "64", "--proj-dim", "32")
    got["teacher"] = {"loss": _losses(teacher), "weights": _weights(teacher)}
    _run("experiments/gen_targets.py", *dr, "--data", TINY, "--device", "cpu", "--workers", "0", "--seed", "3",
         "--teacher", str(teacher / "model.safetensors"), "--out", str(store), "--views-per-image", "4",
         "--batch-size", "16", "--shard-size", "16")
    got["store"] = _records_sha(store)
    # SSL student, in samples (views): 2 passes x K = 2, 8 images x 2 views per step, lr 0.1 per 256 images
    # and the one warm-up pass the reference run had
    _run("experiments/distill_ssl.py", *SMALL, *dr, "--out", str(ssl), "--store", str(store), "--input-size", "24",
         "--epochs", "4", "--batch-size", "16", "--crops-per-image", "2", "--head-hidden", "64", "--lr", "0.05",
         "--warmup-epochs", "2", "--loss", "infonce", "--no-center", "--optimizer", "sgd", "--weight-decay", "5e-4",
         "--predictor-hidden", "0", "--spread-steps", "0")  # the recorded run's settings, also after the defaults change
    got["distill_ssl"] = {"loss": _losses(ssl), "weights": _weights(ssl)}

    clf, soft, sup, lmap, rel = (root / n for n in ("clf", "soft", "sup", "lmap", "rel"))
    _run("experiments/train_classifier.py", *SMALL, *dr, "--out", str(clf), "--input-size", "32", "--epochs", "2",
         "--batch-size", "8", "--no-val")
    got["classifier"] = {"loss": _losses(clf), "weights": _weights(clf)}
    _run("experiments/gen_targets.py", *dr, "--data", TINY, "--device", "cpu", "--workers", "0", "--seed", "3",
         "--teacher", str(clf / "model.safetensors"), "--out", str(soft), "--views-per-image", "4", "--topk", "3")
    got["soft_store"] = _records_sha(soft)
    # supervised student: views per image and views per step; K views in one step, the layout of the reference
    _run("experiments/distill_sup.py", *SMALL, *dr, "--out", str(sup), "--store", str(soft), "--input-size", "24",
         "--epochs", "4", "--batch-size", "16", "--crops-per-image", "2", "--spread-steps", "0", "--no-val")
    got["distill_sup"] = {"loss": _losses(sup), "weights": _weights(sup)}
    _run("experiments/gen_label_map.py", *dr, "--data", TINY, "--device", "cpu", "--workers", "0",
         "--teacher", str(clf / "model.safetensors"), "--out", str(lmap), "--topk", "3")
    _run("experiments/distill_sup.py", *SMALL, *dr, "--out", str(rel), "--targets", "relabel", "--label-map",
         str(lmap), "--input-size", "24", "--epochs", "2", "--batch-size", "8", "--no-val")
    got["relabel"] = {"loss": _losses(rel), "weights": _weights(rel)}
    return got


def _close(a, b, path: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} values, reference has {len(b)}"
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)
    else:
        assert a == b, f"{path}: {a} != {b}"


@pytest.mark.skipif(not REFERENCE, reason="no reference recorded")
def test_tiny_pipeline_matches_the_reference(tmp_path, data_root):
    got = produce(tmp_path, data_root)
    _close(got, REFERENCE, "run")


if __name__ == "__main__":  # record the references: python tests/test_preservation.py DATA_ROOT OUT
    import sys

    from fkd_ssl.data import build_dataset

    build_dataset(TINY, "train", Path(sys.argv[1]), verbose=False)
    print(json.dumps(produce(Path(sys.argv[2]), Path(sys.argv[1])), indent=1))
