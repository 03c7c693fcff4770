"""Label-efficiency runner: two tiny fractions on phantoms -> JSON + plot; done fractions are skipped."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from EchoFMEngine.evaluation import label_efficiency as LE
from EchoFMEngine.evaluation.command import cli

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "Resources" / "configs" / "finetune_view.yaml"
TINY = ["run.steps=2", "data.n_train=4", "data.n_val=1", "data.n_test=0", "run.eval_every=2", "run.ckpt_every=100",
        "run.log_every=1", "run.device=cpu", "data.augment=false"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("le")
    rc = cli(["label-efficiency", "--config", str(CONFIG), "--fractions", "1.0,0.5", "--out", str(out),
              "--data", "phantom:2", "--bootstrap", "20", *TINY])
    return rc, out


def test_writes_json_and_plot(first_run):
    rc, out = first_run
    assert rc == 0
    res = json.loads((out / "label_efficiency.json").read_text())
    assert res["task"] == "view" and res["metric"] == "accuracy" and res["higher_is_better"]
    assert res["held_out"] == {"kind": "phantom", "n_studies": 2, "seed": 90210}
    runs = res["runs"]
    assert [r["fraction"] for r in runs] == [0.5, 1.0]
    # class-stratified subset: 4 phantoms (2 A2C, 2 A4C) -> one of each at 50 %
    assert [r["n_train"] for r in runs] == [2, 4] and all(r["n_train_available"] == 4 for r in runs)
    for r in runs:
        assert r["status"] == "run" and r["n_eval"] == 2 and 0.0 <= r["value"] <= 1.0
        ev = json.loads((out / r["eval"]).read_text())
        assert ev["metrics"]["accuracy"]["value"] == r["value"]
        assert (out / r["model"] / "model.safetensors").is_file()
        desc = json.loads((out / r["model"] / "config.json").read_text())
        assert desc["training"]["label_fraction"] == r["fraction"]
    png = out / "label_efficiency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 200 and np.asarray(im.convert("L")).std() > 5


def test_rerun_skips_done_fractions(first_run, monkeypatch):
    rc, out = first_run
    before = json.loads((out / "label_efficiency.json").read_text())
    from EchoFMEngine.training import finetune

    def no_training(*a, **k):
        raise AssertionError("a done fraction was trained again")

    monkeypatch.setattr(finetune, "run", no_training)
    res = LE.run(CONFIG, [0.5, 1.0], out, TINY, data="phantom:2", n_boot=20, log=lambda *a: None)
    assert [r["status"] for r in res["runs"]] == ["done before (skipped)"] * 2
    assert [r["value"] for r in res["runs"]] == [r["value"] for r in before["runs"]]
    # another metric is read back from the stored evaluations, still without training
    res = LE.run(CONFIG, [0.5, 1.0], out, TINY, data="phantom:2", n_boot=20, metric="f1", log=lambda *a: None)
    assert res["metric"] == "f1" and all(r["value"] is not None for r in res["runs"])
    # different settings in the same folder are refused, not silently mixed
    with pytest.raises(ValueError, match="other settings"):
        LE.run(CONFIG, [0.5], out, [*TINY, "optim.lr=0.1"], data="phantom:2", n_boot=20, log=lambda *a: None)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        LE.parse_fractions("0.5,2")
    with pytest.raises(ValueError, match="numbers"):
        LE.parse_fractions("half")
    assert LE.parse_fractions("1,0.1,0.1") == [0.1, 1.0]
    assert cli(["label-efficiency", "--config", str(CONFIG), "--out", str(tmp_path), "run.out=x"]) == 1
    assert "run.out" in capsys.readouterr().err
    assert cli(["label-efficiency", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 1
    assert "missing.yaml" in capsys.readouterr().err
