"""Config values validated by type and range before anything runs; one message for every bad key;
clean YAML errors; exit status 2 (issue 20, case 5)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from EchoFMEngine.training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("override, why", [
    ("run.steps=-5", "run.steps=-5: Input should be greater than or equal to 1"),
    ("run.batch_size=0", "run.batch_size=0"), ("run.ckpt_every=0", "run.ckpt_every=0"),
    ("optim.base_lr=[1,2]", "optim.base_lr=[1, 2]: Input should be a valid number"),
    ("run.batch_size=-4", "run.batch_size=-4"), ("run.steps=2.5", "valid integer"),
    ("run.steps=true", "run.steps=True: Input should be a valid integer"),
    ("optim.betas=[0.9]", "optim.betas"), ("run.amp=fp8", "run.amp='fp8'"), ("run.device=gpu", "run.device"),
])
def test_bad_values_are_refused_with_the_key(override, why):
    with pytest.raises(ConfigError, match="invalid config value") as e:
        load_config(None, [override])
    assert why in str(e.value)


def test_one_message_lists_every_bad_key_and_unknown_keys_keep_their_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.steps=-5", "run.batch_size=0", "optim.base_lr=[1,2]"])
    msg = str(e.value)
    assert all(k in msg for k in ("run.steps", "run.batch_size", "optim.base_lr"))
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.base_lrr=1", "run.stepz=2"])
    assert "did you mean 'optim.base_lr'" in str(e.value) and "did you mean 'run.steps'" in str(e.value)
    with pytest.raises(ConfigError, match=r"head.dropout=1.5"):
        load_config(None, ["task=view", "head.dropout=1.5"])


def test_valid_values_and_every_shipped_config_still_load():
    cfg = load_config(None, ["run.steps=7", "optim.base_lr=1e-3", "optim.clip_grad=null", "run.device=cuda:1"])
    assert cfg["run"]["steps"] == 7 and cfg["optim"]["base_lr"] == 1e-3 and cfg["optim"]["clip_grad"] is None
    for f in sorted((REPO / "Resources" / "configs").glob("*.yaml")):
        load_config(f)


def test_yaml_errors_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+, column \d+"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: a config must be a mapping of keys, got list"):
        load_config(lst)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["run.steps=[1"])


def test_train_py_exits_2_without_a_traceback_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: pretrain\nrun: {steps: [1\n")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    for args in (["--config", str(bad)], ["--config", str(lst)],
                 ["run.steps=-5", f"run.out={tmp_path / 'r'}", "run.batch_size=0"]):
        r = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                           env=ENV, cwd=REPO, timeout=300)
        assert r.returncode == 2, r.stderr[-1500:]
        assert "Traceback" not in r.stderr and r.stderr.startswith("error:")
    assert not (tmp_path / "r").exists()
