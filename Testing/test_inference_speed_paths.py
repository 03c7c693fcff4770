"""Analysis speed paths: heads on one encoder share its pass (same outputs as separate passes),
encoder grouping by weights, batched windows, the optional int8 path within tolerance, and the
per-stage timings `bench analyze` prints."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from EchoFMEngine.analysis import analyze, inference
from EchoFMEngine.bench.analyze import run_case, stage_table, timing_models
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.heads import EchoFMClassifier, EchoFMRegressor
from EchoFMEngine.clinical.phantoms import make_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = dict(img_size=32, num_frames=8, tubelet=2, patch_size=8)


@pytest.fixture(scope="module")
def study():
    return make_study("A4C", n_frames=90, size=(64, 64), fps=50.0, heart_rate_bpm=72, seed=3)


def _describe(m, task, labels):
    c = m.cfg
    m.description = {"task": task, "labels": labels,
                     "input": {"frames": c.num_frames, "height": c.img_size, "width": c.img_size}}
    return m.eval()


def _heads(encoder, own: bool = False) -> dict:
    """view/as/ef heads on ``encoder`` (``own``: each on an equal-weight copy of it)."""
    torch.manual_seed(1)
    enc = (lambda: copy.deepcopy(encoder)) if own else (lambda: encoder)
    return {"view": _describe(EchoFMClassifier(enc(), 5, freeze_encoder=True), "view",
                              ["A2C", "A4C", "PLAX", "PSAX", "other"]),
            "as": _describe(EchoFMClassifier(enc(), 2, freeze_encoder=True), "as", ["absent", "present"]),
            "ef": _describe(EchoFMRegressor(enc(), freeze_encoder=True, target_mean=55.0, target_std=10.0),
                            "ef", ["ef"])}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_echofm("tiny", **SMALL).eval()


def test_grouping_follows_the_encoder_weights(encoder):
    shared = _heads(encoder)
    assert inference.encoder_groups(shared) == [["view", "as", "ef"]]
    copies = _heads(encoder, own=True)                  # equal weights in separate modules: still one group
    assert inference.encoder_groups(copies) == [["view", "as", "ef"]]
    with torch.no_grad():
        copies["as"].encoder.blocks[0].mlp.fc1.weight.add_(1e-3)   # a fine-tuned encoder of its own
    assert inference.encoder_groups(copies) == [["view", "ef"], ["as"]]
    groups = inference.share_encoders(copies)
    assert copies["ef"].encoder is copies["view"].encoder and copies["as"].encoder is not copies["view"].encoder
    assert groups == [["view", "ef"], ["as"]]


def test_one_shared_pass_gives_the_outputs_of_separate_passes(encoder, study):
    models = _heads(encoder)
    cache: dict = {}
    prepared = inference.prepare(study.cine, 32, cache)
    cycles = [(10, 52), (52, 85)]
    together = inference.shared_clip_outputs(list(models.values()), study.cine, prepared, cycles, "cpu")
    for (task, m), y in zip(models.items(), together):
        alone = inference.clip_outputs(m, study.cine, prepared, cycles, "cpu", batch_size=1)   # one window a call
        assert y.shape == alone.shape and y.shape[0] == 2
        np.testing.assert_allclose(y, alone, rtol=0, atol=1e-5, err_msg=task)


def test_analysis_results_do_not_depend_on_sharing(encoder, study):
    a = analyze(study.cine, models=_heads(encoder), device="cpu")
    b = analyze(study.cine, models=_heads(encoder, own=True), device="cpu")
    assert "model:view+as+ef" in a.timing_s and "model:view+as+ef" in b.timing_s
    assert a.view["label"] == b.view["label"]
    for k, v in a.view["probabilities"].items():
        assert v == pytest.approx(b.view["probabilities"][k], abs=1e-5)
    assert a.scores["ef_regression"]["ef_percent"] == pytest.approx(b.scores["ef_regression"]["ef_percent"],
                                                                    abs=1e-4)


def test_int8_path_stays_within_tolerance_and_leaves_the_originals(encoder, study):
    models = _heads(encoder)
    q = inference.quantize_int8(models)
    assert q["view"].encoder is q["as"].encoder                       # still one shared (int8) encoder
    assert type(models["view"].encoder.blocks[0].mlp.fc1) is torch.nn.Linear
    assert type(q["view"].encoder.blocks[0].mlp.fc1) is not torch.nn.Linear
    prepared = inference.prepare(study.cine, 32, {})
    cycles = [(10, 52), (52, 85)]
    ref = inference.shared_clip_outputs(list(models.values()), study.cine, prepared, cycles, "cpu")
    got = inference.shared_clip_outputs(list(q.values()), study.cine, prepared, cycles, "cpu")
    assert np.abs(ref[0] - got[0]).max() < 0.05 and np.abs(ref[1] - got[1]).max() < 0.05
    assert np.abs(ref[2] - got[2]).max() < 1.0                        # EF in percent points
    own = _heads(copy.deepcopy(encoder))
    inplace = inference.quantize_int8(own, inplace=True)               # no copy: the given encoder converted
    assert inplace["view"].encoder is own["view"].encoder
    assert type(own["view"].encoder.blocks[0].mlp.fc1) is not torch.nn.Linear


def test_bench_models_share_one_frozen_encoder_and_report_stages():
    models = timing_models("tiny", img_size=32)
    assert inference.encoder_groups(models) == [["view", "as", "ef"], ["segment"]]
    own = timing_models("tiny", img_size=32, shared_encoder=False)
    assert len({id(m.encoder) for m in own.values()}) == 4
    row = run_case("echonet", "tiny", 60, "cpu", img_size=32, repeat=1)
    t = row["timing_s"]
    for stage in ("read", "phase", "model:view+as+ef", "model:segment", "figure", "total"):
        assert stage in t and t[stage] >= 0, stage
    table = stage_table(t)
    assert "model:view+as+ef" in table and "figure" in table
