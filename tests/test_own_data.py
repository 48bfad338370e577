"""Every command of docs/own_data.md runs, in order, on the tiny data set (as an ImageFolder), with
random weights in the files it names and tiny sizes substituted through the commands' own flags."""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from conftest import ROOT, run_script
from fkd_ssl.store import TargetStore
from test_teachers_pretrained import command

DOC = ROOT / "docs" / "own_data.md"
_STUDENT = {"--epochs": "2", "--crops-per-image": "2", "--batch-size": "16", "--input-size": "32", "--workers": "0",
            "--device": "cpu"}
TINY_FLAGS = {  # per command: the flags whose values become tiny (set where the doc sets them, else added)
    "gen_targets": {"--views-per-image": "2", "--view-size": "32", "--batch-size": "16", "--workers": "0",
                    "--device": "cpu"},
    "distill_sup": _STUDENT,
    "distill_ssl": {**_STUDENT, "--head-hidden": "32", "--queue-size": "16"},
    "knn": {"--batch-size": "16", "--workers": "0", "--device": "cpu", "--k": "10,20", "--majority-k": "1"},
    "linear_probe": {"--batch-size": "16", "--workers": "0", "--device": "cpu"},
}
VIEW_FLAGS = ("--views-per-image", "--view-size")  # set by --views-from


def doc_commands() -> list[list[str]]:
    """The doc's bash blocks, one argv per command (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip()]


def tiny(argv: list[str], folder) -> list[str]:
    """``argv`` on the tiny ImageFolder with the tiny sizes of :data:`TINY_FLAGS`."""
    argv = [a.replace("imagefolder:my_data", f"imagefolder:{folder}") for a in argv]
    for flag, value in TINY_FLAGS.get(command_name(argv), {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        elif not (flag in VIEW_FLAGS and "--views-from" in argv):
            argv += [flag, value]
    return argv


def command_name(argv: list[str]) -> str:
    return argv[1].split("/")[-1].removesuffix(".py")


@pytest.fixture
def weight_files(tmp_path):
    """Random weights in every file the doc names."""
    torch.manual_seed(0)
    save_file(timm.create_model("resnet50").state_dict(), str(tmp_path / "resnet50.a1_in1k.safetensors"))
    save_file(timm.create_model("vit_small_patch14_dinov2.lvd142m").state_dict(),
              str(tmp_path / "dinov2_vits14.safetensors"))
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50-11ad3fa6.pth")
    from lightly.models.modules.heads import MoCoProjectionHead

    parts = {"backbone": timm.create_model("resnet50", num_classes=0), "projection_head": MoCoProjectionHead(2048, 256, 32)}
    torch.save({f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}, tmp_path / "lightly_moco.ckpt")


def test_every_command_of_the_own_data_doc_runs(capsys, tmp_path, monkeypatch, data_root, weight_files, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    folder = next(data_root.glob("synthetic-*"))  # the built-in set is written in ImageFolder layout
    argvs = doc_commands()
    assert len(argvs) >= 8 and all(a[0] == "python" for a in argvs), argvs
    for argv in argvs:
        argv = tiny(argv, folder)
        if argv[1].startswith("bench/"):
            res = run_script(argv[1], *argv[2:])
            code, out, err = res.returncode, res.stdout, res.stderr
        else:
            code, out, err = command(capsys, command_name(argv), *argv[2:])
        assert code == 0, f"{shlex.join(argv)}\n{err[-3000:]}"
    stores = {n: TargetStore.open(tmp_path / "runs" / f"store-{n}") for n in ("resnet50", "tv_resnet50", "ensemble")}
    ii, rr = np.arange(8), np.ones(8, dtype=int)
    for name in ("tv_resnet50", "ensemble"):  # --views-from, and the ensemble's defaults: the same views
        np.testing.assert_array_equal(stores[name].params_batch(ii, rr), stores["resnet50"].params_batch(ii, rr))
    assert len(stores["ensemble"].identity.teacher["members"]) == 2
    assert (tmp_path / "runs" / "student-dinov2" / "model.safetensors").exists()
