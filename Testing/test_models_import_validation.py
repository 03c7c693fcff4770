"""`models import` and every load check the description against the tensors before building a model;
manifest paths stay inside the models folder; a model that cannot load disables only its task
(issue 20, case 4)."""
from __future__ import annotations

import json
import resource
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from EchoFMEngine.analysis import analyze
from EchoFMEngine.analysis.pipeline import load_models
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.checkpoint import CheckpointError
from EchoFMEngine.models.heads import EchoFMSegmenter
from EchoFMEngine.models.registry import ModelStore
from EchoFMEngine.models.task_checkpoint import load_task_model, save_task_model
from EchoFMEngine.tasks import SEG_LABELS
from EchoFMEngine.training.finetune import model_description


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory):
    torch.manual_seed(0)
    m = EchoFMSegmenter(build_echofm("tiny"))
    desc = model_description(m, "segment", list(SEG_LABELS), "test")
    return save_task_model(m, tmp_path_factory.mktemp("seg") / "seg", desc) / "model.safetensors"


def rewrite(src, dst, desc_change=None, tensor_change=None):
    """A copy of a task checkpoint with its description and/or tensors altered."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    desc = json.loads(meta["description"])
    if desc_change:
        desc_change(desc)
    if tensor_change:
        tensor_change(tensors)
    meta["description"] = json.dumps(desc)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_a_description_claiming_another_task_is_refused_at_import(tmp_path, seg_file):
    def as_view(d):
        d["task"] = "view"
    lying = rewrite(seg_file, tmp_path / "lying.safetensors", as_view)
    with pytest.raises(CheckpointError, match="head cannot serve task 'view'"):
        ModelStore(tmp_path / "m").import_file(lying)
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_wrong_tensor_shapes_are_refused_at_import_and_load(tmp_path, seg_file):
    def shrink(t):
        k = next(k for k in t if t[k].ndim == 2)
        t[k] = t[k][:-1].contiguous()
    bad = rewrite(seg_file, tmp_path / "bad.safetensors", tensor_change=shrink)
    with pytest.raises(CheckpointError, match="tensor shapes differ from the description"):
        ModelStore(tmp_path / "m").import_file(bad)
    with pytest.raises(CheckpointError, match="tensor shapes differ"):
        load_task_model(bad)


def test_a_tiny_file_claiming_a_huge_encoder_is_refused_without_allocating(tmp_path, seg_file):
    def huge(d):
        d["encoder_config"].update(embed_dim=16384, depth=64, num_heads=16)
    save_file({"encoder.x": torch.zeros(4)}, str(tmp_path / "t.safetensors"))
    with safe_open(str(seg_file), framework="pt") as f:
        meta = dict(f.metadata())
    desc = json.loads(meta["description"])
    huge(desc)
    meta["description"] = json.dumps(desc)
    save_file({"encoder.x": torch.zeros(4)}, str(tmp_path / "huge.safetensors"), metadata=meta)
    assert (tmp_path / "huge.safetensors").stat().st_size < 64 * 1024
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="tensors do not match|tensor shapes differ"):
        ModelStore(tmp_path / "m").import_file(tmp_path / "huge.safetensors")
    assert time.perf_counter() - t < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 500 * 1024     # < 500 MB (KiB units)


def test_manifest_paths_outside_the_folder_are_never_read(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("../../etc/passwd", "/etc/passwd"):
        (folder / "manifest.json").write_text(json.dumps({"format": "echofm-models-v1", "encoders": {},
                                                          "tasks": {"view": {"file": name, "sha256": "0"}}}))
        with pytest.raises(CheckpointError, match="outside the models folder|must be a name inside"):
            ModelStore(folder).get("view")


def test_a_model_that_cannot_load_disables_its_task_and_the_rest_runs(tmp_path, seg_file):
    store = ModelStore(tmp_path / "m")
    store.import_file(seg_file)
    path = store.get("segment")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))                      # checksum no longer matches
    models = load_models(tmp_path / "m", device="cpu")
    assert "segment" not in models and "could not be loaded" in models.reasons["segment"]
    cine = np.zeros((12, 32, 32, 3), np.uint8)
    cine[:, 8:24, 8:24] = (np.arange(12)[:, None, None, None] * 10).astype(np.uint8)
    from EchoFMEngine.cine import Cine, SourceInfo
    res = analyze(Cine(frames=cine, fps=30.0, source=SourceInfo(format="npy", file_name="x.npy")), models=models)
    assert "could not be loaded" in res.needs["segment"] and res.phase
