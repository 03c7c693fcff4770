"""Pretraining loop: config checking, exact resume after SIGKILL, DDP on CPU (gloo), NaN stop, demo."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from EchoFMEngine.training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny", "model.img_size=32", "model.num_frames=8", "model.tubelet=2", "model.patch_size=8",
        "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.n_studies=8", "run.tensorboard=false",
        "optim.base_lr=0.05", "optim.warmup_steps=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def pretrain_cmd(out: Path, *extra: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "EchoFMEngine", "pretrain", "--no-progress", *TINY, f"run.out={out}", *extra]
    return cmd + (["--resume"] if resume else [])


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def losses(out: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(out / "log.csv"))]


def test_unknown_config_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optim.base_lr'"):
        load_config(None, ["optim.base_lrr=0.1"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("run:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'run.stepz'; did you mean 'run.steps'"):
        load_config(cfg_file)
    assert load_config(None, ["run.steps=7", "optim.betas=[0.9,0.99]"])["optim"]["betas"] == [0.9, 0.99]


def test_cli_reports_bad_model_key_before_work(tmp_path):
    r = subprocess.run(pretrain_cmd(tmp_path / "x", "model.depht=3"), capture_output=True, text=True, env=ENV)
    assert r.returncode == 1 and "did you mean 'depth'" in r.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run_bitwise(tmp_path):
    args = ("run.steps=120", "run.batch_size=2", "run.ckpt_every=10", "run.keep_last=3")
    full = tmp_path / "full"
    subprocess.run(pretrain_cmd(full, *args), check=True, env=ENV, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(pretrain_cmd(cut, *args), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((cut / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "model").exists(), "run finished before it could be killed"
    r = subprocess.run(pretrain_cmd(cut, *args, resume=True), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((cut / "summary.json").read_text())
    assert 0 < summary["resumed_from"] < 120
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full) == losses(cut)                       # the log continues without duplicates
    assert len(list((cut / "checkpoints").glob("step_*.pt"))) <= 3


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = tmp_path / "single"
    subprocess.run(pretrain_cmd(single, "run.steps=6", "run.batch_size=4", "run.ckpt_every=100"),
                   check=True, env=ENV, capture_output=True)
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "EchoFMEngine", "pretrain", "--no-progress", *TINY, f"run.out={ddp}", "run.steps=6",
           "run.batch_size=2", "run.ckpt_every=100"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2
    a, b = losses(single), losses(ddp)
    assert len(a) == len(b) == 6
    assert a[0] != a[-1]
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    r = subprocess.run(pretrain_cmd(out, "run.steps=30", "run.batch_size=2", "run.ckpt_every=1",
                                    "optim.base_lr=1e12", "optim.warmup_steps=0", "optim.clip_grad=null"),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 1
    assert "non-finite loss" in r.stderr and "Last good checkpoint" in r.stderr
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    assert ckpts, "no checkpoint kept"
    state = torch.load(ckpts[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow
def test_demo_runs_end_to_end_with_a_short_schedule(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "demo", "--out", str(tmp_path / "demo"),
                        "--no-progress", "run.steps=30", "data.n_studies=8", "run.log_every=1",
                        "segment.steps=20", "segment.n_train=4", "segment.n_test=2"],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["pretrain"]["final_recon"] < metrics["pretrain"]["first_recon"]
    assert set(metrics["periodicity_spearman"]) >= {"random_init", "pretrained"}
    for png in ("loss_curve.png", "self_similarity.png", "segmentation.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 10_000
    assert (tmp_path / "demo" / "pretrain" / "model" / "model.safetensors").is_file()
    seg = metrics["segment"]
    assert seg["settings"]["steps"] == 20 and seg["final_loss"] < seg["first_loss"]
    assert set(seg["held_out"]["structures"]) == {"lv_endo", "lv_epi", "la"}
    assert 0.0 <= seg["held_out"]["mean_dice"] <= 1.0 and seg["held_out"]["n_clips"] == 2
    desc = json.loads((tmp_path / "demo" / "segment" / "model" / "config.json").read_text())
    assert desc["task"] == "segment"
    ana = metrics["analysis"]           # the fine-tuned segmenter, imported and run by analyze
    assert ana["phase_method"] == "ecg" and len(ana["ed_frames"]) == len(ana["true_ed_frames"])
    assert "segment" not in ana["not_computed"] and "view" in ana["not_computed"]
    assert (tmp_path / "demo" / "analysis" / ana["study"] / "masks.nrrd").is_file()   # the derived study id


@pytest.mark.parametrize("name", ["demo", "pretrain_vitl_paper", "pretrain_vitb"])
def test_shipped_configs_are_valid(name):
    from EchoFMEngine.models import make_config
    cfg = load_config(REPO / "Resources" / "configs" / f"{name}.yaml")
    model_cfg = make_config(cfg["model"])
    if name == "pretrain_vitl_paper":
        assert (model_cfg.embed_dim, model_cfg.depth, model_cfg.num_frames, model_cfg.img_size,
                model_cfg.tubelet, model_cfg.patch_size, model_cfg.mask_ratio) == (1024, 24, 32, 224, 4, 16, 0.75)


def test_incompatible_init_checkpoint_fails_before_training(tmp_path):
    from EchoFMEngine.models import CheckpointError, build_echofm, save_pretrained
    from EchoFMEngine.training.pretrain import build_model
    save_pretrained(build_echofm("tiny"), tmp_path / "tiny96")
    cfg = load_config(None, ["model.embed_dim=48", "model.num_heads=3", f"init_from={tmp_path / 'tiny96'}"])
    with pytest.raises(CheckpointError, match=r"tiny96.*has shape .*96.* in the file but .*48.* in the model"):
        build_model(cfg)
