"""Bad input at every entry point (issue 7 §3): each case exits non-zero with one ``error: ...``
line naming the file, folder or flag at fault, no traceback, and no finished output damaged.

Most cases run in-process through the commands' own ``main`` under :func:`fkd_ssl.cli.run_main`
(what ``python <script>`` runs); a few real subprocesses prove the command line prints no
traceback.  The matrix these tests cover is written up in ``docs/bad_input.md``; set
``FKD_BAD_INPUT_MATRIX=<file.json>`` to dump every error line the tests saw.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, run_script
from fkd_ssl.checkpoint import save_model, save_state
from fkd_ssl.cli import run_main
from fkd_ssl.data import build_dataset
from fkd_ssl.models import Encoder, ModelSpec

CPU = ["--device", "cpu"]
_MATRIX: dict[str, str] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _dump_matrix():
    yield
    dest = os.environ.get("FKD_BAD_INPUT_MATRIX")
    if dest:
        Path(dest).write_text(json.dumps(_MATRIX, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- running scripts in-process

#: case name -> command module (fkd_ssl.commands.<module>, the console script fkd-<module>)
COMMANDS = {"pretrain": "pretrain_teacher", "gen_targets": "gen_targets", "distill_ssl": "distill_ssl",
            "train_classifier": "train_classifier", "distill_sup": "distill_sup", "gen_label_map": "gen_label_map",
            "quickstart": "quickstart", "knn": "knn", "linear_probe": "linear_probe", "report": "report",
            "store": "store"}


def _module(name: str):
    return importlib.import_module(f"fkd_ssl.commands.{COMMANDS[name]}")


@dataclass
class Result:
    code: object
    out: str
    err: str


def run(capsys, script: str, *argv) -> Result:
    """``python <script> argv...`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(_module(script).main, [str(a) for a in argv])
    cap = capsys.readouterr()
    return Result(e.value.code, cap.out, cap.err)


def fails(res: Result, *needles: str, case: str | None = None) -> str:
    """Exit code 2, the last stderr line is the only ``error:`` line, it holds every needle, no traceback."""
    assert "Traceback" not in res.err and "Traceback" not in res.out, res.err[-3000:]
    assert res.code == 2, (res.code, res.err[-3000:])
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.err[-3000:]
    for n in needles:
        assert str(n) in errors[0], (n, errors[0])
    if case:
        _MATRIX[case] = errors[0]
    return errors[0]


def succeeds(res: Result) -> Result:
    assert res.code in (0, None), res.err[-3000:]
    assert "Traceback" not in res.err
    return res


def tree_hash(path: Path, skip: tuple[str, ...] = ("log.jsonl",)) -> dict[str, str]:
    """sha256 of every file under ``path`` (a file or a folder)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip)
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------- fixtures (built once)


def _image_folder(dst: Path, src_root: Path, classes: int = 2, train: int = 4, val: int = 2) -> Path:
    """A small imagefolder (JPEGs) made of the tiny synthetic set's images."""
    src = build_dataset(TINY, "train", src_root, verbose=False).root
    for split, n in (("train", train), ("val", val)):
        for c in sorted(p.name for p in src.iterdir())[:classes]:
            (dst / split / c).mkdir(parents=True)
            for k, f in enumerate(sorted((src / c).iterdir())[:n]):
                Image.open(f).convert("RGB").save(dst / split / c / f"{k}.jpg", quality=90)
    return dst


def _gen_args(w, data: str, teacher, out, *extra):
    args = ["--data", data, "--data-root", w.data_root, "--teacher", teacher, "--out", out, "--views-per-image", "2",
            "--batch-size", "64", "--workers", "0", "--shard-size", "16", "--group", "4", *CPU, *extra]
    return [str(a) for a in args]


@pytest.fixture(scope="module")
def w(tmp_path_factory, data_root):
    """Everything the cases need: datasets good and bad, teachers, checkpoints of the wrong kind,
    finished and half-written stores, a finished feature cache."""
    root = tmp_path_factory.mktemp("bad_input")
    ns = SimpleNamespace(root=root, data_root=str(data_root))

    # datasets
    clean = _image_folder(root / "clean", data_root)
    ns.clean = f"imagefolder:{clean}"
    ns.missing = f"imagefolder:{root / 'no_such_set'}"
    (root / "empty").mkdir()
    ns.empty = f"imagefolder:{root / 'empty'}"
    (root / "empty_split" / "train").mkdir(parents=True)
    (root / "empty_split" / "val").mkdir(parents=True)
    ns.empty_split = f"imagefolder:{root / 'empty_split'}"
    noimg = shutil.copytree(clean, root / "noimg")
    (noimg / "train" / "zz_empty_class").mkdir()
    (noimg / "train" / "zz_empty_class" / "README.txt").write_text("no images here")
    ns.noimg, ns.noimg_class = f"imagefolder:{noimg}", noimg / "train" / "zz_empty_class"
    extra = shutil.copytree(clean, root / "extra")
    for c in (extra / "train").iterdir():
        (c / "notes.txt").write_text("not an image")
        (c / ".DS_Store").write_bytes(b"\0\1\2")
        (c / "labels.csv").write_text("a,b\n")
    ns.extra = f"imagefolder:{extra}"
    ns.corrupt, ns.bad_file = {}, {}
    for kind in ("truncated", "zero_byte", "garbage"):
        d = shutil.copytree(clean, root / f"corrupt_{kind}")
        f = sorted((d / "train").rglob("*.jpg"))[1]
        data = f.read_bytes()
        f.write_bytes({"truncated": data[: len(data) // 2], "zero_byte": b"",
                       "garbage": os.urandom(len(data))}[kind])
        ns.corrupt[kind], ns.bad_file[kind] = f"imagefolder:{d}", f

    # models
    torch.manual_seed(0)
    ssl = Encoder(ModelSpec(arch="test_resnet", input_size=32, head="moco", head_hidden=32, head_out=16))
    ns.teacher = save_model(root / "teacher" / "model", ssl.eval(), {"method": "test"})
    torch.manual_seed(1)
    other = Encoder(ModelSpec(arch="test_resnet", input_size=32, head="moco", head_hidden=32, head_out=16))
    ns.other_teacher = save_model(root / "other_teacher" / "model", other.eval(), {"method": "test"})
    cls = Encoder(ModelSpec(arch="test_resnet", input_size=32, num_classes=10))
    ns.classifier = save_model(root / "classifier" / "model", cls.eval(), {"method": "test"})

    # checkpoints of the wrong kind
    ns.state = root / "run" / "state.safetensors"
    save_state(ns.state, {"model": {"w": torch.zeros(3)}, "epoch": 1, "rng": np.zeros(4, np.uint32)})
    ns.json = root / "run" / "config.json"
    ns.json.write_text(json.dumps({"arch": "resnet18"}))
    ns.text = root / "run" / "notes.txt"
    ns.text.write_text("this is not a checkpoint\n")
    blob = ns.teacher.read_bytes()
    ns.truncated = root / "truncated" / "model.safetensors"
    ns.truncated.parent.mkdir()
    ns.truncated.write_bytes(blob[: len(blob) // 2])

    # stores: finished (TINY, teacher), of another dataset, half-written (killed before finalize)
    ns.store = root / "store"
    gen = _module("gen_targets")
    assert gen.main(_gen_args(ns, TINY, ns.teacher, ns.store)) == 0
    ns.other_store = root / "other_store"
    assert gen.main(_gen_args(ns, ns.clean, ns.teacher, ns.other_store)) == 0
    ns.soft_store = root / "soft_store"  # class probabilities of the classifier on the small imagefolder
    assert gen.main(_gen_args(ns, ns.clean, ns.classifier, ns.soft_store)) == 0
    ns.half_store = shutil.copytree(ns.store, root / "half_store")
    (ns.half_store / "manifest.json").unlink()
    (ns.half_store / "shard-00001.sha256.json").unlink()
    return ns


# ----------------------------------------------------------------------------- per-script argument lists


def base_args(w, script: str, out: Path, data: str | None = None) -> list:
    """A valid, small command of ``script`` (the case under test changes or adds one thing)."""
    data = data or TINY
    r = ["--data-root", w.data_root]
    small = ["--arch", "test_resnet", "--input-size", "32", "--workers", "0", *CPU]
    return {
        "pretrain": ["--data", data, *r, "--out", out, *small, "--batch-size", "4", "--epochs", "1", "--queue-size", "8",
                     "--proj-dim", "16", "--proj-hidden", "32"],
        "gen_targets": _gen_args(w, data, w.teacher, out),
        "distill_ssl": ["--data", data, *r, "--store", w.store, "--out", out, *small, "--crops-per-image", "2",
                        "--batch-size", "8", "--epochs", "2", "--head-hidden", "32", "--queue-size", "8"],
        "distill_sup": ["--targets", "hard", "--data", data, *r, "--out", out, *small, "--batch-size", "4",
                        "--epochs", "1", "--no-val"],
        "train_classifier": ["--data", data, *r, "--out", out, *small, "--batch-size", "4", "--epochs", "1", "--no-val"],
        "gen_label_map": ["--data", data, *r, "--teacher", w.classifier, "--out", out, "--workers", "0",
                          "--batch-size", "8", *CPU],
        "knn": ["--checkpoint", "pixels:8", "--data", data, *r, "--out", out, "--workers", "0", *CPU, "--no-cache",
                "--results", out / "results.jsonl", "--k", "3"],
        "linear_probe": ["--checkpoint", "pixels:8", "--data", data, *r, "--out", out, "--workers", "0", *CPU,
                         "--no-cache", "--results", out / "results.jsonl", "--max-iter", "5"],
        "quickstart": ["--fast", "--data", data, *r, "--out", out, "--workers", "0", *CPU],
        "export-fkd": ["export-fkd", w.store, "--data", data, *r, "--out", out],
        "import-fkd": ["import-fkd", w.root / "no_fkd_labels", "--data", data, *r, "--out", out, "--workers", "0"],
    }[script]


def call(capsys, w, script: str, out: Path, data: str | None = None, *extra) -> Result:
    module = "store" if script in ("export-fkd", "import-fkd") else script
    return run(capsys, module, *base_args(w, script, out, data), *extra)


DATA_SCRIPTS = ["pretrain", "gen_targets", "distill_ssl", "distill_sup", "train_classifier", "gen_label_map", "knn",
                "linear_probe", "quickstart", "export-fkd", "import-fkd"]


# ----------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("script", DATA_SCRIPTS)
def test_bad_dataset_folders(capsys, w, tmp_path, script):
    cases = [
        ("missing dataset dir", w.missing, ["no_such_set does not exist"]),
        ("empty dataset dir", w.empty, ["empty/train is missing"]),
        ("empty split dir", w.empty_split, ["empty_split/train", "has no class folders"]),
        ("class folder with no images", w.noimg, [str(w.noimg_class), "has no images"]),
    ]
    for i, (case, data, needles) in enumerate(cases):
        out = tmp_path / f"out{i}"
        fails(call(capsys, w, script, out, data), *needles, case=f"{script} | {case}")
        assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))


def test_non_image_files_among_images_are_ignored(capsys, w, tmp_path):
    clean = build_dataset(w.clean, "train", verbose=False)
    extra = build_dataset(w.extra, "train", verbose=False)
    assert extra.ignored_files == 3 * clean.num_classes and len(extra) == len(clean)
    assert extra.fingerprint() == clean.fingerprint()  # same images, same identity
    res = succeeds(call(capsys, w, "knn", tmp_path / "knn", w.extra))
    assert "knn: " in res.out
    _MATRIX["knn | non-image files among images"] = "(ignored; exit 0)"


@pytest.mark.parametrize("kind", ["truncated", "zero_byte", "garbage"])
@pytest.mark.parametrize("script", ["pretrain", "distill_sup", "train_classifier", "knn", "linear_probe"])
def test_corrupt_image_is_an_error_naming_it(capsys, w, tmp_path, script, kind):
    line = fails(call(capsys, w, script, tmp_path / "o", w.corrupt[kind]), str(w.bad_file[kind]),
                 case=f"{script} | corrupt image ({kind})")
    assert "cannot decode image" in line


@pytest.mark.parametrize("kind", ["truncated", "zero_byte", "garbage"])
def test_corrupt_image_is_skipped_by_gen_targets_and_gen_label_map(capsys, w, tmp_path, kind):
    from fkd_ssl.relabel import LabelMaps
    from fkd_ssl.store import TargetStore

    succeeds(call(capsys, w, "gen_targets", tmp_path / "s", w.corrupt[kind]))
    store = TargetStore.open(tmp_path / "s", verify=True)
    assert [e["path"] for e in store.skipped_entries] == [str(w.bad_file[kind])]
    succeeds(call(capsys, w, "gen_label_map", tmp_path / "m", w.corrupt[kind]))
    assert [e["path"] for e in LabelMaps.open(tmp_path / "m").manifest["skipped"]] == [str(w.bad_file[kind])]
    if kind == "garbage":  # a student trains from such a store on the readable images only
        succeeds(call(capsys, w, "distill_ssl", tmp_path / "d", w.corrupt[kind], "--store", tmp_path / "s"))
        assert (tmp_path / "d" / "model.safetensors").exists()
    _MATRIX[f"gen_targets | corrupt image ({kind})"] = "(recorded as skipped with its path; exit 0)"
    _MATRIX[f"gen_label_map | corrupt image ({kind})"] = "(recorded as skipped with its path; exit 0)"


def test_corrupt_image_in_a_dataloader_worker_prints_one_line(w, tmp_path):
    """With --workers 1 the error crosses a DataLoader worker; the real CLI still prints one line."""
    args = [str(a) for a in base_args(w, "pretrain", tmp_path / "o", w.corrupt["garbage"])]
    args[args.index("--workers") + 1] = "1"
    res = run_script("experiments/pretrain_teacher.py", *args)
    fails(Result(res.returncode, res.stdout, res.stderr), str(w.bad_file["garbage"]), "cannot decode image",
          case="pretrain | corrupt image, --workers 1 (subprocess)")


# ----------------------------------------------------------------------------- checkpoints


CKPT_FLAGS = [  # (script, flag, extra flags that make the flag apply)
    ("gen_targets", "--teacher", []),
    ("distill_ssl", "--online-teacher", []),
    ("distill_sup", "--teacher", ["--targets", "online", "--epochs", "4"]),
    ("distill_sup", "--init", []),
    ("train_classifier", "--init", []),
    ("gen_label_map", "--teacher", []),
    ("knn", "--checkpoint", []),
    ("linear_probe", "--checkpoint", []),
]


@pytest.mark.parametrize("script, flag, extra", CKPT_FLAGS)
def test_checkpoint_of_the_wrong_kind(capsys, w, tmp_path, script, flag, extra):
    cases = [
        ("training state", w.state, ["training state, not a model"]),
        ("store folder", w.store, ["folder"]),
        ("JSON file", w.json, ["JSON file without its weights"]),
        ("text file", w.text, ["cannot be read" if flag == "--init" else "not a model of this project"]),
        ("truncated model", w.truncated, ["truncated"]),
        ("missing file", w.root / "nope.safetensors", ["does not exist"]),
    ]
    before = {p: tree_hash(p) for p in (w.state, w.json, w.text, w.truncated, w.store)}
    for i, (case, ref, needles) in enumerate(cases):
        out = tmp_path / f"o{i}"
        line = fails(call(capsys, w, script, out, None, *extra, flag, ref), str(ref), *needles,
                     case=f"{script} {flag} | {case}")
        assert "plain state dict" not in line or case == "text file"
        assert not out.exists() or not any(out.rglob("*.safetensors"))
    assert before == {p: tree_hash(p) for p in before}


def test_checkpoint_errors_through_the_real_cli(w, tmp_path):
    res = run_script("experiments/gen_targets.py", *[str(a) for a in _gen_args(w, TINY, w.text, tmp_path / "s")])
    fails(Result(res.returncode, res.stdout, res.stderr), str(w.text), case="gen_targets --teacher | text file (subprocess)")


# ----------------------------------------------------------------------------- stores


@pytest.mark.parametrize("script", ["distill_ssl", "distill_sup"])
def test_bad_stores_for_students(capsys, w, tmp_path, script):
    extra = ["--targets", "store", "--epochs", "4"] if script == "distill_sup" else []
    cases = [
        ("store of another dataset", w.other_store, ["another dataset"]),
        ("half-written store (no manifest.json)", w.half_store, ["not finished", "rerun"]),
        ("missing store", w.root / "no_store", ["does not exist"]),
        ("a checkpoint given as store", w.teacher, ["not a target store"]),
        ("a folder that is not a store", w.root / "run", ["not a target store"]),
    ]
    if script == "distill_sup":
        cases.append(("soft-label store of another dataset", w.soft_store, ["another dataset"]))
        cases.append(("store of an embedding teacher", w.store, ["holds proj targets, not class probabilities"]))
    before = {p: tree_hash(p) for p in (w.other_store, w.half_store, w.store)}
    for i, (case, store, needles) in enumerate(cases):
        out = tmp_path / f"o{i}"
        fails(call(capsys, w, script, out, None, *extra, "--store", store), str(store), *needles,
              case=f"{script} --store | {case}")
        assert not out.exists()
    assert before == {p: tree_hash(p) for p in before}


def test_online_teacher_other_than_the_stores_is_a_warning(capsys, w, tmp_path):
    """A store of another teacher is valid input for a student; only the online baseline that
    replays it with a different teacher says so (and goes on: that is the experiment asked for)."""
    res = succeeds(call(capsys, w, "distill_ssl", tmp_path / "d", None, "--online-teacher", w.other_teacher,
                        "--online-replay"))
    assert f"warning: --online-teacher {w.other_teacher} is not the teacher that made --store" in res.out
    _MATRIX["distill_ssl --online-teacher | store of another teacher"] = \
        "(warning: ... is not the teacher that made --store ...; exit 0)"


def test_gen_targets_refuses_a_store_of_another_teacher_or_dataset(capsys, w, tmp_path):
    store = shutil.copytree(w.store, tmp_path / "store")
    before = tree_hash(store)
    fails(run(capsys, "gen_targets", *_gen_args(w, TINY, w.other_teacher, store)), str(store), "other settings",
          "identity.teacher.hash", case="gen_targets --out | store of another teacher")
    fails(run(capsys, "gen_targets", *_gen_args(w, w.clean, w.teacher, store)), str(store), "other settings",
          "identity.dataset.fingerprint", case="gen_targets --out | store of another dataset")
    assert tree_hash(store) == before


def test_gen_targets_resumes_a_half_written_store(capsys, w, tmp_path):
    from fkd_ssl.store import TargetStore

    half = shutil.copytree(w.half_store, tmp_path / "half")
    succeeds(run(capsys, "gen_targets", *_gen_args(w, TINY, w.teacher, half)))
    a, b = TargetStore.open(half, verify=True), TargetStore.open(w.store)
    assert a.manifest["shards"] == b.manifest["shards"]
    _MATRIX["gen_targets --out | half-written store"] = "(resumed and finished; exit 0)"


def test_store_commands_on_bad_stores(capsys, w, tmp_path):
    damaged = shutil.copytree(w.store, tmp_path / "damaged")
    rec = damaged / "shard-00000.records.npy"
    data = bytearray(rec.read_bytes())
    data[-1] ^= 0xFF
    rec.write_bytes(bytes(data))
    cut = shutil.copytree(w.store, tmp_path / "cut")
    (cut / "shard-00001.records.npy").write_bytes((cut / "shard-00001.records.npy").read_bytes()[:100])
    cases = [
        ("half-written store", w.half_store, ["not finished"]),
        ("missing store", w.root / "no_store", ["does not exist"]),
        ("a checkpoint file", w.teacher, ["not a target store"]),
        ("a folder that is not a store", w.root / "run", ["not a target store"]),
        ("truncated shard", cut, ["shard-00001.records.npy", "truncated"]),
    ]
    for cmd in ("verify", "info"):
        for case, path, needles in cases:
            fails(run(capsys, "store", cmd, path), str(path), *needles, case=f"store {cmd} | {case}")
    fails(run(capsys, "store", "verify", damaged), str(rec), "corrupt", case="store verify | a flipped byte")
    for case, path, needles in cases:
        fails(run(capsys, "store", "export-fkd", path, "--data", TINY, "--data-root", w.data_root, "--out",
                  tmp_path / "e"), str(path), *needles, case=f"store export-fkd | {case}")
    fails(run(capsys, "store", "export-fkd", w.soft_store, "--data", TINY, "--data-root", w.data_root, "--out",
              tmp_path / "e2"), str(w.soft_store), "another dataset",
          case="store export-fkd | store of another dataset")
    fails(call(capsys, w, "import-fkd", tmp_path / "i"), "no_fkd_labels", case="store import-fkd | missing folder")
    fails(run(capsys, "store", "import-fkd", w.text, "--data", TINY, "--data-root", w.data_root, "--out",
              tmp_path / "i2"), str(w.text), "is a file, not a folder", case="store import-fkd | a file, not a folder")


def test_store_verify_through_the_real_cli(w):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "fkd_ssl.store", "verify", str(w.half_store)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    fails(Result(proc.returncode, proc.stdout, proc.stderr), str(w.half_store), "not finished",
          case="store verify | half-written store (subprocess)")


# ----------------------------------------------------------------------------- output folders

OUT_SCRIPTS = ["pretrain", "gen_targets", "distill_ssl", "distill_sup", "train_classifier", "gen_label_map", "knn",
               "linear_probe", "quickstart", "export-fkd", "import-fkd"]


@pytest.mark.parametrize("script", OUT_SCRIPTS)
def test_out_is_a_file_or_under_a_file(capsys, w, tmp_path, script):
    f = tmp_path / "precious.txt"
    f.write_text("precious")
    fails(call(capsys, w, script, f), str(f), "is a file", case=f"{script} --out | a file")
    fails(call(capsys, w, script, f / "sub"), str(f / "sub"), "cannot create", case=f"{script} --out | a path under a file")
    assert f.read_text() == "precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 555 does not stop root from writing "
                                              "(the path-under-a-file case covers an unwritable --out)")
@pytest.mark.parametrize("script", ["pretrain", "gen_targets", "knn"])
def test_out_not_writable(capsys, w, tmp_path, script):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        fails(call(capsys, w, script, ro), str(ro), "not writable", case=f"{script} --out | not writable")
    finally:
        ro.chmod(0o755)


def test_report_bad_results_and_out(capsys, w, tmp_path):
    f = tmp_path / "precious.txt"
    f.write_text("precious")
    fails(run(capsys, "report", "--results", tmp_path / "none.jsonl", "--out", tmp_path / "r"), "none.jsonl",
          case="report --results | missing file")
    fails(run(capsys, "report", "--results", w.text, "--out", tmp_path / "r"), str(w.text),
          case="report --results | a text file")
    fails(run(capsys, "report", "--results", w.teacher, "--out", tmp_path / "r"), str(w.teacher),
          case="report --results | a binary file")
    fails(call(capsys, w, "knn", tmp_path / "k2", None, "--results", w.root / "run"), str(w.root / "run"),
          case="knn --results | a folder")
    good = tmp_path / "results.jsonl"
    succeeds(call(capsys, w, "knn", tmp_path / "k", None, "--results", good))
    fails(run(capsys, "report", "--results", good, "--out", f), str(f), "is a file", case="report --out | a file")
    assert f.read_text() == "precious"


def test_cache_dir_and_data_root_under_a_file(capsys, w, tmp_path):
    f = tmp_path / "precious.txt"
    f.write_text("precious")
    args = [a for a in base_args(w, "knn", tmp_path / "k") if a != "--no-cache"]
    fails(run(capsys, "knn", *args, "--cache-dir", f / "cache"), str(f / "cache"), case="knn --cache-dir | under a file")
    fails(run(capsys, "pretrain", *base_args(w, "pretrain", tmp_path / "p"), "--data-root", f), str(f),
          "--data-root", case="pretrain --data-root | a file")
    assert f.read_text() == "precious"


# ----------------------------------------------------------------------------- a full disk


def test_full_disk_in_the_store_writer(capsys, w, tmp_path, monkeypatch):
    """A disk that fills while a store is written: one line naming the file; a finished store
    rerun on a full disk is left byte-identical, and so is every other store."""
    store = shutil.copytree(w.store, tmp_path / "store")
    before, other = tree_hash(store), tree_hash(w.other_store)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", enospc)
        fails(run(capsys, "gen_targets", *_gen_args(w, TINY, w.teacher, tmp_path / "new")), "header.json",
              "No space left on device", case="gen_targets | disk full (new store)")
        fails(run(capsys, "gen_targets", *_gen_args(w, TINY, w.teacher, store)), "manifest.json",
              "No space left on device", case="gen_targets | disk full (rerun of a finished store)")
    assert tree_hash(store) == before and tree_hash(w.other_store) == other
    assert not [p for p in store.iterdir() if ".tmp" in p.name]
    # the half-written one resumes and finishes once there is space again
    succeeds(run(capsys, "gen_targets", *_gen_args(w, TINY, w.teacher, tmp_path / "new")))


def test_full_disk_in_the_label_map_writer(capsys, w, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", enospc)
        fails(call(capsys, w, "gen_label_map", tmp_path / "m"), str(tmp_path / "m"), "No space left on device",
              case="gen_label_map | disk full")
    succeeds(call(capsys, w, "gen_label_map", tmp_path / "m"))  # and finishes once there is space


def test_full_disk_in_the_checkpoint_saver(capsys, w, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "t"
    args = base_args(w, "pretrain", out, w.clean)
    succeeds(run(capsys, "pretrain", *args, "--epochs", "2", "--max-minutes", "0.0000001"))  # one step, then saved
    before = tree_hash(out, skip=("metrics.jsonl",))
    assert any(k.endswith("model.safetensors") for k in before) and any(k.endswith("state.safetensors") for k in before)

    def full(*_a, **_k):  # what safetensors raises when the disk is full
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    with monkeypatch.context() as m:
        m.setattr("fkd_ssl.checkpoint.save_file", full)
        fails(run(capsys, "pretrain", *args, "--epochs", "2"), str(out / "state.safetensors"),
              "No space left on device", case="pretrain | disk full (checkpoint, resumed run)")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", enospc)
        fails(run(capsys, "pretrain", *args, "--epochs", "2"), str(out / "state.safetensors"),
              "No space left on device", case="pretrain | disk full at fsync (checkpoint)")
    after = tree_hash(out, skip=("metrics.jsonl",))
    assert {k: v for k, v in after.items() if "safetensors" in k or k.endswith("model.json")} == \
        {k: v for k, v in before.items() if "safetensors" in k or k.endswith("model.json")}
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_full_disk_in_the_feature_cache(capsys, w, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = [a for a in base_args(w, "knn", tmp_path / "k") if a != "--no-cache"] + ["--cache-dir", cache]
    succeeds(run(capsys, "knn", *args))
    before = tree_hash(cache)
    with monkeypatch.context() as m:
        m.setattr(np, "save", enospc)
        fails(run(capsys, "knn", *args, "--cache-dtype", "float32"), "labels.npy", "No space left on device",
              case="knn | disk full (feature cache)")
    assert {k: v for k, v in tree_hash(cache).items() if k in before} == before
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    succeeds(run(capsys, "knn", *args, "--cache-dtype", "float32"))  # resumes once there is space


# ----------------------------------------------------------------------------- numeric flags and --arch

NUMERIC = [
    ("pretrain", ["--epochs", "0"]), ("pretrain", ["--batch-size", "-1"]), ("pretrain", ["--workers", "-1"]),
    ("pretrain", ["--lr", "0"]), ("pretrain", ["--input-size", "0"]), ("pretrain", ["--queue-size", "0"]),
    ("pretrain", ["--temperature", "-0.1"]), ("pretrain", ["--lr", "nan"]), ("pretrain", ["--momentum", "inf"]),
    ("pretrain", ["--crop-min", "0"]), ("pretrain", ["--seed", "-1"]),
    ("gen_targets", ["--views-per-image", "0"]), ("gen_targets", ["--batch-size", "0"]),
    ("gen_targets", ["--workers", "-1"]), ("gen_targets", ["--shard-size", "0"]), ("gen_targets", ["--group", "-2"]),
    ("gen_targets", ["--temp", "0"]), ("gen_targets", ["--topk", "0"]), ("gen_targets", ["--view-size", "0"]),
    ("distill_ssl", ["--epochs", "0"]), ("distill_ssl", ["--batch-size", "-1"]), ("distill_ssl", ["--workers", "-1"]),
    ("distill_ssl", ["--crops-per-image", "0"]), ("distill_ssl", ["--lr", "0"]), ("distill_ssl", ["--queue-size", "-1"]),
    ("distill_ssl", ["--input-size", "0"]), ("distill_ssl", ["--head-dim", "0"]),
    ("distill_ssl", ["--epochs", "3"]), ("distill_ssl", ["--batch-size", "7"]),  # not whole passes / images at K=2
    ("distill_sup", ["--epochs", "0"]), ("distill_sup", ["--batch-size", "-1"]), ("distill_sup", ["--lr", "0"]),
    ("distill_sup", ["--crops-per-image", "0"]), ("distill_sup", ["--mixup", "-1"]), ("distill_sup", ["--workers", "-1"]),
    ("train_classifier", ["--epochs", "0"]), ("train_classifier", ["--batch-size", "0"]),
    ("train_classifier", ["--lr", "-1"]),
    ("gen_label_map", ["--topk", "0"]), ("gen_label_map", ["--batch-size", "0"]), ("gen_label_map", ["--workers", "-1"]),
    ("gen_label_map", ["--input-size", "0"]),
    ("knn", ["--k", "0"]), ("knn", ["--batch-size", "0"]), ("knn", ["--workers", "-1"]), ("knn", ["--temperature", "0"]),
    ("knn", ["--input-size", "0"]), ("knn", ["--query-chunk", "0"]),
    ("linear_probe", ["--holdout", "0"]), ("linear_probe", ["--holdout", "1.5"]), ("linear_probe", ["--max-iter", "0"]),
    ("linear_probe", ["--epochs", "0"]), ("linear_probe", ["--lr", "0"]), ("linear_probe", ["--wd", "-1"]),
    ("linear_probe", ["--wd", "nan"]),
    ("quickstart", ["--workers", "-1"]), ("quickstart", ["--seed", "-1"]),
    ("export-fkd", ["--topk", "0"]), ("import-fkd", ["--shard-size", "0"]), ("import-fkd", ["--workers", "-1"]),
]


@pytest.mark.parametrize("script, flag", NUMERIC, ids=[f"{s}{f[0]}={f[1]}" for s, f in NUMERIC])
def test_numeric_flags_out_of_range(capsys, w, tmp_path, script, flag):
    out = tmp_path / "o"
    line = fails(call(capsys, w, script, out, None, *flag), flag[0], case=f"{script} {flag[0]} {flag[1]}")
    assert "1e-300" not in line
    assert not out.exists()


ARCH = [  # (script, flags naming an unknown architecture)
    ("pretrain", ["--arch", "resnet_nope"]),
    ("distill_ssl", ["--arch", "resnet_nope"]),
    ("distill_sup", ["--arch", "resnet_nope"]),
    ("train_classifier", ["--arch", "resnet_nope"]),
    ("knn", ["--checkpoint", "random:resnet_nope"]),
    ("linear_probe", ["--checkpoint", "random:resnet_nope"]),
    ("knn", ["--checkpoint", "tv:nope_net"]),
]


@pytest.mark.parametrize("script, flags", ARCH, ids=[f"{s}-{f[-1]}" for s, f in ARCH])
def test_unknown_arch(capsys, w, tmp_path, script, flags):
    out = tmp_path / "o"
    fails(call(capsys, w, script, out, None, *flags), "nope", case=f"{script} {' '.join(flags)}")
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_unknown_arch_of_a_plain_state_dict(capsys, w, tmp_path):
    sd = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, sd)
    fails(run(capsys, "gen_targets", *_gen_args(w, TINY, sd, tmp_path / "s"), "--arch", "resnet_nope"), "resnet_nope",
          case="gen_targets --teacher plain.pth --arch resnet_nope")
    fails(run(capsys, "gen_label_map", *base_args(w, "gen_label_map", tmp_path / "m"), "--teacher", sd,
              "--teacher-arch", "resnet_nope"), "resnet_nope",
          case="gen_label_map --teacher plain.pth --teacher-arch resnet_nope")
    fails(run(capsys, "knn", *base_args(w, "knn", tmp_path / "k"), "--checkpoint", sd, "--arch", "resnet18"), str(sd),
          case="knn --checkpoint plain.pth --arch resnet18 (does not fit)")
