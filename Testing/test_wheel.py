"""The engine as an installed wheel finds its configs (package data) and runs: build the wheel offline, install it
into a fresh venv (torch and the other dependencies come from this Python's site-packages), and from a folder
outside the checkout run train.py's entry point, `python -m EchoFMEngine`, and one short pretraining config.

Slow (about a minute on 2 busy cores): the build, the venv and four interpreters that import torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("EchoFMEngine", "EchoFMSlicer", "pyproject.toml", "README.md", "LICENSE")
# one pretraining step of the demo config on a 2-study phantom set, at the smallest clip the model takes
QUICK = ["--no-progress", "run.steps=1", "run.batch_size=1", "data.n_studies=2", "model.num_frames=8",
         "model.img_size=32", "run.device=cpu", "run.tensorboard=false"]

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=240):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(venv python, venv bin folder, a working folder outside the checkout, the wheel file)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"              # a copy, so the build writes no build/ or egg-info into the checkout
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("echofm_slicer-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", tmp / "venv"], cwd=tmp)
    bindir = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--force-reinstall",
          "--no-index", "--no-warn-script-location", wheel], cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    return python, bindir, work, wheel


def _env(bindir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", "")
    return env


def test_wheel_holds_the_configs_and_the_installed_engine_is_the_wheel(venv):
    python, bindir, work, wheel = venv
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("EchoFMEngine/configs/")}
    assert {f"EchoFMEngine/configs/{p.name}" for p in (REPO / "EchoFMEngine" / "configs").glob("*.yaml")} <= shipped
    probe = ("import EchoFMEngine, EchoFMEngine.configs as c, sys; "
             "print(EchoFMEngine.__file__); print(c.find_config('finetune_ef')); "
             "print(c.find_config('Resources/configs/demo.yaml')); print(','.join(c.names()))")
    lines = _run([python, "-c", probe], cwd=work, env=_env(bindir)).stdout.splitlines()
    venv_root = python.parent.parent
    for line in lines[:3]:
        assert Path(line).resolve().is_relative_to(venv_root.resolve()), f"{line} is not inside the venv {venv_root}"
    assert "finetune_view" in lines[3].split(",") and "demo" in lines[3].split(",")


def test_train_entry_point_and_module_help_run_from_the_wheel(venv):
    python, bindir, work, _ = venv
    env = _env(bindir)
    script = bindir / ("echofm-train.exe" if os.name == "nt" else "echofm-train")
    out = _run([script, "--help"], cwd=work, env=env).stdout
    assert "python train.py --config FILE" in out and "finetune_segment" in out   # the shipped configs are listed
    out = _run([python, "-m", "EchoFMEngine", "--help"], cwd=work, env=env).stdout
    assert "commands:" in out and "finetune" in out


def test_a_shipped_config_runs_by_name_from_the_wheel(venv):
    python, bindir, work, _ = venv
    out = work / "quick"
    _run([python, "-m", "EchoFMEngine.train", "--config", "demo", f"run.out={out}", *QUICK], cwd=work,
         env=_env(bindir))
    assert (out / "summary.json").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
