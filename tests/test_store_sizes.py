"""fkd_ssl.store.sizes (printed by bench/store_sizes.py) against real stores: its bytes-per-view and
total-size formulas must be exactly what StoreWriter writes, and the size table in
docs/recipes/README.md must be its current output (so the recipes' numbers cannot drift)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fkd_ssl.store import StoreWriter, TargetStore, finalize, make_codec
from fkd_ssl.store import layout as L
from fkd_ssl.store import sizes as S
from fkd_ssl.store.geometry import Geometry, ReplayGeometry

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "store_sizes.py"
RECIPES = ROOT / "docs" / "recipes" / "README.md"

N, R, SHARD = 23, 3, 10  # 3 shards, the last holding 3 images
SKIP = 7  # one image recorded as unreadable: its records still take their place


def _targets(rng: np.random.Generator, b: int, dim: int, probs: bool) -> np.ndarray:
    z = rng.standard_normal((b, R, dim)).astype(np.float32)
    if not probs:
        return z
    e = np.exp(3 * (z - z.max(axis=-1, keepdims=True)))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _geometry(P):
    """float32 geometry of P parameters, or gen_targets.py's (``replay``) when P is None."""
    return Geometry(P) if P else ReplayGeometry(14, {"photometric": False}, 3)


def _write(path: Path, codec, dim: int, P: int | None) -> TargetStore:
    from fkd_ssl.views import ViewConfig, sample_views

    rng = np.random.default_rng(0)
    probs = codec.name == "topk"
    if codec.name == "pq":
        codec.fit(_targets(rng, 100, dim, False).reshape(-1, dim))
    w = StoreWriter.create_or_resume(path, {"teacher": "toy", "dataset": "sizes"}, num_images=N, views_per_image=R,
                                     param_dim=P or 14, target_dim=dim, codec=codec, shard_size=SHARD,
                                     provenance={"command": "test", "git_sha": "test"}, geometry=_geometry(P))
    todo = [i for i in w.missing_images().tolist() if i != SKIP]
    w.skip(SKIP, "/data/broken.jpg", "cannot identify image file")
    for k in range(0, len(todo), 4):
        idx = np.asarray(todo[k:k + 4], dtype=np.int64)
        params = (rng.random((len(idx), R, P), dtype=np.float32) if P else
                  np.stack([sample_views(ViewConfig(photometric=False), 3, i, range(R), 30, 40) for i in idx]))
        w.write(idx, params, _targets(rng, len(idx), dim, probs), sizes=[(30, 40)] * len(idx))
    w.complete_owned()
    w.close()
    finalize(path)
    return TargetStore.open(path)


CASES = [
    ("fp32", {}, 16, 14),
    ("fp16", {}, 16, 14),
    ("int8", {}, 16, 14),
    ("topk", {"k": 5, "num_classes": 50}, 50, 14),
    ("topk", {"k": 5, "num_classes": 50}, 50, None),
    ("fp16", {}, 16, None),
    ("topk", {"k": 10, "num_classes": 50}, 50, 5),
    ("pq", {"M": 4}, 16, 14),
]


@pytest.mark.parametrize("name,config,dim,P", CASES, ids=[f"{c[0]}-{c[2]}-P{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_formula_matches_a_written_store(tmp_path, name, config, dim, P):
    if name == "pq":
        pytest.importorskip("faiss")
    codec = make_codec(name, **config)
    store = _write(tmp_path / "store", codec, dim, P)

    rb = S.record_bytes(make_codec(name, **config), dim, _geometry(P))
    assert rb == store.stored_dtype.itemsize == 4 * (P or 0) + codec.bytes_per_view(dim)

    records = sorted(tmp_path.glob("store/shard-*.records.npy"))
    per_image = sorted(tmp_path.glob("store/shard-*.done.npy")) + sorted(tmp_path.glob("store/shard-*.images.npy"))
    assert len(records) == 3 and len(per_image) == (3 if P else 6)
    # the records' payload, header aside, is exactly N x R x bytes-per-view
    payload = sum(f.stat().st_size - S.npy_header_bytes(store.stored_dtype, np.load(f, mmap_mode="r").shape)
                  for f in records)
    assert payload == N * R * rb

    # the whole store, less its small JSON files and codec state, is what the script predicts
    small = [n for n in store.files() if n.endswith(".json") or n.startswith("codec.")]
    assert {n for n in store.files() if n not in small} == {f.name for f in records + per_image}
    predicted = S.store_bytes(N, R, make_codec(name, **config), dim, _geometry(P), SHARD)
    assert store.nbytes() - sum((store.path / n).stat().st_size for n in small) == predicted
    assert sum(f.stat().st_size for f in records + per_image) == predicted


def test_param_dim_is_what_gen_targets_stores():
    """gen_targets.py stores VIEW_PARAM_DIM float32 per view; the script must use the same P."""
    assert S.gen_targets_param_dim() == 14
    views = pytest.importorskip("fkd_ssl.views")  # needs torch
    assert S.gen_targets_param_dim() == views.VIEW_PARAM_DIM


def test_header_bytes_at_imagenet_shapes(tmp_path):
    """Full-size ImageNet shards (4096 images, and the last one of 3215) get the header the store's
    own file creation writes (the files are sparse: nothing but the header is written)."""
    dt = L.record_dtype(S.gen_targets_param_dim(), make_codec("topk", k=5, num_classes=1000).fields(1000))
    assert 312 * 4096 + 3215 == S.IMAGENET_TRAIN
    for i, (dtype, shape) in enumerate([(dt, (4096, 500)), (dt, (3215, 40)), (np.dtype(np.uint8), (4096,))]):
        f = tmp_path / f"a{i}.npy"
        L.create_npy(f, dtype, shape)
        header = f.stat().st_size - int(np.prod(shape)) * dtype.itemsize
        assert S.npy_header_bytes(dtype, shape) == header
        f.unlink()


def test_recipes_table_is_current():
    text = RECIPES.read_text()
    m = re.search(r"<!-- store_sizes:begin -->\n(.*?)<!-- store_sizes:end -->", text, re.S)
    assert m, f"{RECIPES} has no store_sizes block"
    assert m.group(1) == S.render(), ("the size table in docs/recipes/README.md is stale: "
                                      "replace it with the output of python bench/store_sizes.py")


def test_script_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--images", "1000", "--views", "10"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| R=10 |" in out.stdout and "| topk k=5 (fp16 values) | 20 |" in out.stdout


# ----------------------------------------------------------------------------- the recipes' commands

RECIPE_FILES = [RECIPES, ROOT / "docs" / "recipes" / "imagenet_ssl.sh",
                ROOT / "docs" / "recipes" / "imagenet_sup.sh"]
CHECKED = ("experiments/pretrain_teacher.py", "experiments/gen_targets.py", "experiments/distill_ssl.py",
           "experiments/distill_sup.py", "experiments/gen_label_map.py", "eval/knn.py", "eval/linear_probe.py")
UNCHECKED = ("eval/report.py",)  # takes no flags
_SCRIPT = re.compile(r"(?:^|\s)((?:experiments|eval)/[A-Za-z_]+\.py)(?=\s|$)")
_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Z][A-Z0-9_]*)=(.*)$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _shell_text(path: Path) -> str:
    text = path.read_text()
    if path.suffix == ".md":  # only the fenced bash blocks
        text = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    return text.replace("\\\n", " ")


def _variables(path: Path) -> dict[str, str]:
    """VAR=value / export VAR=value / VAR=${VAR:-default} of ``path`` (then of the README's
    set-up block), unresolved."""
    raw: dict[str, str] = {}
    for f in (path, RECIPES):
        for line in _shell_text(f).splitlines():
            m = _ASSIGN.match(line)
            if m and not m.group(2).startswith("("):
                raw.setdefault(m.group(1), m.group(2).split("  #")[0].strip().strip('"'))
    return raw


def _expand(text: str, env: dict[str, str]) -> str:
    def sub(m):
        name = m.group(1) or m.group(3)
        if name in env and env[name] != m.group(0):
            return _expand(env[name], {k: v for k, v in env.items() if k != name})
        return m.group(2) if m.group(2) is not None else "x"  # ${X:-default} or an unknown (loop) variable
    return _VAR.sub(sub, text)


def _commands() -> list[tuple[str, str, list[str]]]:
    """(file, script, args) of every call to a project script in the recipes."""
    import shlex

    out = []
    for f in RECIPE_FILES:
        env = _variables(f)
        for line in _shell_text(f).splitlines():
            m = _SCRIPT.search(line)
            if not m or line.lstrip().startswith("#"):
                continue
            tokens = shlex.split(_expand(line, env), comments=True)
            script = m.group(1)
            out.append((f.name, script, tokens[tokens.index(script) + 1:]))
    return out


def _parse(script: str, args: list[str], monkeypatch):
    """The command's own argparse result for ``args`` (after its checks) and the exact option strings it knows."""
    import argparse

    seen: dict[str, set] = {}
    original = argparse.ArgumentParser.parse_args

    def spy(self, a=None, namespace=None):
        seen["flags"] = set(self._option_string_actions)
        return original(self, a, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    mod = importlib.import_module(f"fkd_ssl.commands.{Path(script).stem}")
    monkeypatch.setattr(mod, "run", lambda a: a)  # main(): parse and check, then hand the namespace to run
    return mod.main(args), seen["flags"]


def _check(commands, monkeypatch) -> int:
    n = 0
    for name, script, args in commands:
        try:
            ns, flags = _parse(script, args, monkeypatch)
        except SystemExit as e:
            pytest.fail(f"{name}: {script} {' '.join(args)}: refused by its parser (exit {e.code})")
        unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in flags]
        assert not unknown, f"{name}: {script} has no {unknown} (abbreviations are not allowed in recipes)"
        assert ns is not None
        n += 1
    return n


def test_recipe_commands_use_real_flags(monkeypatch):
    """Every call of a project script in the recipes parses with that script's own parser."""
    pytest.importorskip("torch")
    commands = _commands()
    scripts = {s for _, s, _ in commands}
    assert set(CHECKED) <= scripts and scripts <= set(CHECKED) | set(UNCHECKED), scripts
    for f in RECIPE_FILES:
        assert {s for n, s, _ in commands if n == f.name} & set(CHECKED), f"no checked command in {f.name}"
    assert _check([c for c in commands if c[1] in CHECKED], monkeypatch) >= 20
