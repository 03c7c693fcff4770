"""train.py: explicit exit codes, missing-package message (Slicer's Python lacks some), task dispatch."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_packages_are_named_with_the_install_command(monkeypatch, capsys):
    train = load_train_module()
    monkeypatch.setitem(train.REQUIRED, "surely_not_installed_pkg", "surely-not-installed")
    assert train.main(["--config", "x.yaml"]) == 3
    err = capsys.readouterr().err
    assert "surely-not-installed" in err and "-m pip install surely-not-installed" in err


def test_unknown_task_and_missing_config_exit_with_status_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: dance\n")
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "task 'dance' has no training loop" in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(tmp_path / "absent.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "absent.yaml" in r.stderr


def test_overrides_may_come_before_and_after_flags():
    from EchoFMEngine.training.pretrain import parse_args

    a = parse_args(["run.steps=3", "--no-progress", "run.seed=1"])
    assert a.no_progress and a.overrides == ["run.steps=3", "run.seed=1"]
