"""Fine-tuning loop and task checkpoints: every phantom config runs through train.py's entry point
and writes a loadable, self-describing model; A4C vs A2C >= 95 % held out; exact resume; a frozen
encoder stays bit-identical; label fractions; the registry path; and the bad-input errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from EchoFMEngine.models import CheckpointError, build_echofm, save_pretrained
from EchoFMEngine.models.heads import EchoFMClassifier, EchoFMSegmenter
from EchoFMEngine.models.task_checkpoint import load_task_model, read_task_description, save_task_model
from test_segment import write_legacy_segmenter

from EchoFMEngine.training import finetune, segment
from EchoFMEngine.training.config import ConfigError, load_config
from EchoFMEngine.training.entry import cli
from EchoFMEngine.training.task_data import build_task_data, phantom_task_items, stratified_subset
from EchoFMEngine.training.task_eval import collate as task_collate

CONFIGS = finetune.CONFIGS
QUICK = ["run.steps=2", "run.eval_every=2", "run.ckpt_every=2", "run.batch_size=2", "run.log_every=1",
         "data.n_train=2", "data.n_val=1", "data.n_test=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(task: str, out: Path, *extra: str) -> dict:
    return load_config(CONFIGS / f"finetune_{task}.yaml", [f"run.out={out}", *QUICK, *extra])


def encoder_tensors(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")
            and not k.startswith(("encoder.decoder", "encoder.projector", "encoder.mask_token"))}


# ------------------------------------------------------------------ acceptance on phantoms
def test_view_classifier_separates_phantom_a4c_from_a2c(tmp_path):
    m = finetune.run(load_config(CONFIGS / "finetune_view.yaml", [
        f"run.out={tmp_path}", "data.n_train=16", "data.n_val=4", "data.n_test=20", "run.steps=60",
        "run.eval_every=20", "run.ckpt_every=100"]), progress=False)
    assert m["labels"] == ["A2C", "A4C"] and m["test"]["n"] == 20
    assert m["test"]["accuracy"] >= 0.95, m["test"]
    assert m["train_history"][-1]["loss"] < m["train_history"][0]["loss"]
    desc = read_task_description(tmp_path / "model")
    assert desc["metrics"]["test"]["accuracy"] == m["test"]["accuracy"]


# ------------------------------------------------------------------ every config via train.py
@pytest.mark.parametrize("task,extra", [("view", []), ("as", []), ("ef", []), ("ar", []), ("segment", []),
                                        ("segment", ["head.frame_model=true"])])
def test_each_phantom_config_trains_and_writes_a_self_describing_model(tmp_path, task, extra, capsys):
    out = tmp_path / "run"
    assert cli(["--config", str(CONFIGS / f"finetune_{task}.yaml"), "--no-progress", f"run.out={out}",
                *QUICK, *extra]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["steps"] == 2 and metrics["test"] is not None
    model = load_task_model(out / "model", task=task)
    d = model.description
    assert d["format"] == "echofm-task-v1" and d["task"] == task and d["trained_on"] == "phantom"
    assert d["input"]["height"] == d["input"]["width"] == 32 and d["input"]["frames"] == 8
    assert d["preprocessing"]["sector_crop"] is True
    inp = d["input"]
    video = torch.rand(2, 3, inp["frames"], inp["height"], inp["width"])
    if task == "view":
        assert d["labels"] == ["A2C", "A4C"] and model.predict_proba(video).shape == (2, 2)
    elif task == "as":
        assert d["labels"] == ["proxy_ef_ge_50", "proxy_ef_lt_50"] and "proxy" in d["label_source"]
        assert model.predict_proba(video).shape == (2, 2)
    elif task == "ef":
        assert d["labels"] == ["ef_percent"] and d["unit"] == "%" and model.predict(video).shape == (2,)
    elif task == "ar":
        assert d["labels"] == ["proxy_non_severe", "proxy_severe"] and d["views"] == ["A3C", "A5C", "PSAX", "PLAX"]
        vids = torch.rand(1, 4, 3, inp["frames"], 32, 32)
        assert model.predict_proba(vids, torch.tensor([[True, False, False, True]])).shape == (1, 2)
    else:
        assert d["labels"] == ["background", "lv_cavity", "lv_myocardium", "la"]
        assert d["head"]["kind"] == ("frame_segmenter" if extra else "segmenter")
        assert d["preprocessing"]["frames_policy"] == ("per_frame" if extra else "cycle")
        assert model.predict(video).shape == (2, 8, 32, 32)
        assert 0.0 <= metrics["test"]["mean_dice"] <= 1.0
    with pytest.raises(CheckpointError, match=rf"checkpoint of task '{task}'.*'(view|ef)' was expected"):
        load_task_model(out / "model", task="ef" if task != "ef" else "view")


# ------------------------------------------------------------------ resume, frozen, fractions
def test_resume_after_interruption_gives_the_same_result(tmp_path):
    extra = ["run.steps=6", "run.ckpt_every=2", "run.eval_every=3", "data.n_train=4", "run.keep_last=5"]
    full = finetune.run(config("view", tmp_path / "full", *extra), progress=False)

    def stop_at_4(step):
        if step == 4:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        finetune.run(config("view", tmp_path / "cut", *extra), progress=False, on_step=stop_at_4)
    assert not (tmp_path / "cut" / "model").exists()
    resumed = finetune.run(config("view", tmp_path / "cut", *extra), resume=True, progress=False)
    assert resumed["resumed_from"] == 4
    for key in ("val", "test", "train_history", "val_history", "best_step"):
        assert resumed[key] == full[key], key
    a, b = (load_file(str(tmp_path / f / "model" / "model.safetensors")) for f in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def test_frozen_run_keeps_the_pretrained_encoder_bit_identical(tmp_path):
    torch.manual_seed(3)
    enc = build_echofm("tiny", img_size=32, num_frames=8, tubelet=2, patch_size=8)
    save_pretrained(enc, tmp_path / "enc")
    finetune.run(config("view", tmp_path / "run", f"init_from={tmp_path / 'enc'}", "head.mode=frozen",
                        "run.steps=4", "optim.lr=0.05"), progress=False)
    model = load_task_model(tmp_path / "run" / "model", task="view")
    own = enc.state_dict()
    for k, v in encoder_tensors(model).items():
        assert torch.equal(v, own[k[len("encoder."):]]), k
    head0 = EchoFMClassifier(enc, 2).head.fc.weight
    assert not torch.equal(model.head.fc.weight, head0)
    assert model.description["training"]["mode"] == "frozen"


def test_compile_option_wraps_the_training_forward(tmp_path, monkeypatch):
    # torch.compile itself takes minutes on CPU (measured 207 s for the first steps): the test checks
    # that run.compile reaches it with the mode, and that the loop trains through the wrapper.
    calls = []

    def fake_compile(module, mode):
        calls.append((type(module).__name__, mode))
        return module

    monkeypatch.setattr(finetune.torch, "compile", fake_compile)
    m = finetune.run(config("view", tmp_path, "run.compile=true", "run.compile_mode=reduce-overhead"), progress=False)
    assert calls == [("EchoFMClassifier", "reduce-overhead")] and m["test"]["n"] == 1
    with pytest.raises(ConfigError, match="run.compile"):
        config("view", tmp_path, "run.compile=3")


def test_label_fraction_is_seeded_and_class_stratified():
    targets = [0] * 50 + [1] * 30 + [2] * 2
    a = stratified_subset(targets, 0.1, seed=1)
    assert a == stratified_subset(targets, 0.1, seed=1) and a != stratified_subset(targets, 0.1, seed=2)
    counts = np.bincount(np.asarray(targets)[a], minlength=3)
    assert counts.tolist() == [5, 3, 1]                     # every class kept, at least one sample
    assert stratified_subset(targets, 1.0, 0) == list(range(len(targets)))
    assert len(stratified_subset([0.5] * 10, 0.3, 0)) == 3
    with pytest.raises(ValueError, match="label_fraction"):
        stratified_subset(targets, 0.0, 0)


def test_label_fraction_reduces_training_samples_only(tmp_path):
    m = finetune.run(config("view", tmp_path, "data.n_train=8", "data.label_fraction=0.25"), progress=False)
    assert (m["n_train"], m["n_train_available"], m["n_val"]) == (2, 8, 1)
    assert any("label_fraction 0.25" in n for n in m["notes"])


def test_best_model_selection_rules(tmp_path):
    from EchoFMEngine.training.task_eval import is_better

    nan = float("nan")
    assert is_better(0.5, None, True) and is_better(0.6, 0.5, True) and not is_better(0.6, 0.5, False)
    assert is_better(0.5, 0.5, True, loss=0.1, best_loss=0.2) and not is_better(0.5, 0.5, True, 0.3, 0.2)
    assert not is_better(nan, 0.5, True, 0.0, 1.0) and is_better(0.1, nan, True)
    assert is_better(nan, nan, True, 0.1, 0.2) and not is_better(nan, nan, True, 0.3, 0.2)
    with pytest.raises(KeyError, match="run.select_metric 'acc' is not a validation metric of task 'view'"):
        finetune.run(config("view", tmp_path, "run.select_metric=acc"), progress=False)


def test_ar_phantoms_have_missing_views_and_proxy_labels():
    items = phantom_task_items("ar", 6, size=32, frames=8, seed=4)
    valid = torch.stack([it["view_valid"] for it in items])
    assert valid.any(1).all() and not valid.all()
    for it in items:
        assert it["video"].shape == (4, 3, 8, 32, 32)
        assert float(it["video"][~it["view_valid"]].abs().sum()) == 0.0
        assert it["label"] == int(it["severity"] >= 2.5) and 0.0 <= it["severity"] <= 4.0


# ------------------------------------------------------------------ registry data and bad input
@pytest.fixture(scope="module")
def csv_root(tmp_path_factory):
    """Four phantom clips as .npy files with ED/ES masks, listed in a CSV (train/val/test)."""
    from EchoFMEngine.clinical.phantoms import make_study

    root = tmp_path_factory.mktemp("csvdata")
    rows = ["path,split,view,ef,mask_path,mask_frames"]
    for i, (view, split) in enumerate([("A4C", "train"), ("A2C", "train"), ("A4C", "val"), ("A2C", "test")]):
        s = make_study(view, n_frames=16, size=(64, 64), fps=15, seed=40 + i)
        np.save(root / f"clip{i}.npy", s.cine.frames)
        ed, es = int(s.ed_frames[0]), int(s.es_frames[0])
        np.save(root / f"mask{i}.npy", s.masks[[ed, es]])
        rows.append(f"clip{i}.npy,{split},{view},{s.ef:.1f},mask{i}.npy,{ed};{es}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("task", ["view", "segment"])
def test_csv_dataset_trains_through_the_registry(tmp_path, csv_root, task):
    m = finetune.run(config(task, tmp_path, "data.kind=csv", f"data.root={csv_root}"), progress=False)
    assert m["trained_on"] == "csv" and (m["n_train"], m["n_val"], m["n_test"]) == (2, 1, 1)
    d = read_task_description(tmp_path / "model")
    if task == "view":
        assert d["labels"] == ["A2C", "A4C", "PLAX", "PSAX", "other"]      # the task's default classes
    else:
        assert m["test"]["n_frames"] >= 1 and 0.0 <= m["test"]["mean_dice"] <= 1.0


def with_sources(folder: Path, csv_root: Path, sources: str) -> Path:
    """The CSV folder's clips listed again with a mask_sources column (one source per mask frame)."""
    folder.mkdir(parents=True, exist_ok=True)
    head, *rows = (csv_root / "labels.csv").read_text().splitlines()
    rows = [r.replace("clip", str(csv_root / "clip")).replace("mask", str(csv_root / "mask")) + f",{sources}"
            for r in rows]
    (folder / "labels.csv").write_text("\n".join([head + ",mask_sources", *rows]) + "\n")
    return folder


def test_propagated_frames_are_weighted_or_excluded_as_configured(tmp_path, csv_root):
    """ED corrected, ES propagated (the Slicer export's mask_sources): weight 1 and 0.5 keep both
    frames with the ES one weighted; weight 0 leaves ES out of the labelled frames, hence the loss."""
    root = with_sources(tmp_path / "prop", csv_root, "corrected;propagated")
    torch.manual_seed(0)
    model = EchoFMSegmenter(build_echofm("tiny", img_size=32, num_frames=8)).eval()
    items, losses = {}, {}
    for w in (1.0, 0.5, 0.0):
        cfg = config("segment", tmp_path / "r", "data.kind=csv", f"data.root={root}", f"data.propagated_weight={w}")
        items[w] = build_task_data("segment", cfg["data"], 8, 32).train[0]
        with torch.no_grad():
            losses[w] = segment.batch_loss(model, task_collate([items[w]]))
    valid = items[1.0]["mask_valid"]
    ed, es = torch.nonzero(valid).flatten().tolist()
    assert items[1.0]["mask_weight"][[ed, es]].tolist() == [1.0, 1.0]
    assert items[0.5]["mask_weight"][[ed, es]].tolist() == [1.0, 0.5]
    assert torch.nonzero(items[0.0]["mask_valid"]).flatten().tolist() == [ed]
    ed_only = {**task_collate([items[1.0]]), "mask_valid": items[0.0]["mask_valid"][None]}
    with torch.no_grad():
        torch.testing.assert_close(losses[0.0], segment.batch_loss(model, ed_only))
        assert losses[1.0] == segment.batch_loss(model, segment.collate([items[1.0]]))
    assert losses[0.5] != losses[1.0]
    m = finetune.run(config("segment", tmp_path / "run", "data.kind=csv", f"data.root={root}",
                            "data.propagated_weight=0"), progress=False)
    assert m["test"]["n_frames"] == 1                          # the test clip's propagated ES frame is left out


def test_propagated_weight_and_mask_sources_are_checked(tmp_path, csv_root):
    for bad in ("1.5", "-0.1", "yes"):
        with pytest.raises(ConfigError, match="data.propagated_weight"):
            config("segment", tmp_path, f"data.propagated_weight={bad}")
    root = with_sources(tmp_path / "bad", csv_root, "corrected;guessed")
    with pytest.raises(ValueError, match=r"labels.csv: row 2: unknown mask source\(s\) \['guessed'\]"):
        finetune.run(config("segment", tmp_path / "r", "data.kind=csv", f"data.root={root}"), progress=False)
    root = with_sources(tmp_path / "short", csv_root, "corrected")
    with pytest.raises(ValueError, match="row 2: mask_sources lists 1 source"):
        finetune.run(config("segment", tmp_path / "r2", "data.kind=csv", f"data.root={root}"), progress=False)


def test_unknown_class_name_in_a_label_file_is_named(tmp_path, csv_root, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (csv_root / "labels.csv").read_text().replace("A2C", "A3C", 1)
    text = text.replace("clip", str(csv_root / "clip")).replace("mask", str(csv_root / "mask"))
    (bad / "labels.csv").write_text(text)
    assert cli(["--config", str(CONFIGS / "finetune_view.yaml"), "--no-progress", f"run.out={tmp_path / 'r'}",
                "data.kind=csv", f"data.root={bad}", *QUICK]) == 1
    err = capsys.readouterr().err
    assert "labels.csv" in err and "row 3" in err and "'A3C'" in err


def test_mask_of_the_wrong_size_is_named(tmp_path, csv_root, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in csv_root.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    np.save(bad / "mask0.npy", np.zeros((2, 48, 64), dtype=np.uint8))
    assert cli(["--config", str(CONFIGS / "finetune_segment.yaml"), "--no-progress", f"run.out={tmp_path / 'r'}",
                "data.kind=csv", f"data.root={bad}", *QUICK, "data.augment=false"]) == 1
    err = capsys.readouterr().err
    assert "mask0.npy" in err and "does not match its frames" in err


def test_splits_without_samples_are_reported(tmp_path, csv_root, capsys):
    no_test = tmp_path / "no_test"
    no_test.mkdir()
    rows = [r.replace("clip", str(csv_root / "clip")).replace("mask", str(csv_root / "mask"))
            for r in (csv_root / "labels.csv").read_text().splitlines() if ",test," not in r]
    (no_test / "labels.csv").write_text("\n".join(rows) + "\n")
    assert cli(["--config", str(CONFIGS / "finetune_view.yaml"), "--no-progress", f"run.out={tmp_path / 'r'}",
                "data.kind=csv", f"data.root={no_test}", *QUICK]) == 1
    err = capsys.readouterr().err
    assert "no samples for split 'test'" in err and str(no_test) in err
    with pytest.raises(ValueError, match="data.n_val must be >= 1"):
        finetune.run(config("view", tmp_path / "p", "data.n_val=0"), progress=False)
    with pytest.raises(ValueError, match="has no targets for task 'ar'"):
        finetune.run(config("ar", tmp_path / "q", "data.kind=csv", f"data.root={csv_root}"), progress=False)


def test_checkpoints_of_another_kind_are_refused_with_file_and_tasks(tmp_path):
    torch.manual_seed(0)
    enc = build_echofm("tiny", img_size=32, num_frames=8, tubelet=2)
    save_pretrained(enc, tmp_path / "encoder")
    with pytest.raises(CheckpointError, match=r"encoder.*encoder-only EchoFM checkpoint"):
        load_task_model(tmp_path / "encoder", task="view")
    legacy = write_legacy_segmenter(EchoFMSegmenter(enc), tmp_path / "legacy")      # the retired format
    with pytest.raises(CheckpointError, match=r"legacy.*task 'segment' \(segmenter model\), but task 'view'"):
        load_task_model(legacy, task="view")
    seg = load_task_model(legacy, task="segment")
    assert seg.description["labels"] == ["background", "lv_cavity", "lv_myocardium", "la"]
    desc = {"task": "view", "labels": ["A2C", "A4C"], "trained_on": "test", "preprocessing": {},
            "input": {"frames": 8, "height": 32, "width": 32, "channels": 3, "value_range": [0, 1],
                      "layout": "[B, C, T, H, W]"}}
    with pytest.raises(ValueError, match="cannot be saved as task 'view'"):
        save_task_model(seg, tmp_path / "x", desc)
    with pytest.raises(ValueError, match="3 outputs"):
        save_task_model(EchoFMClassifier(enc, 3), tmp_path / "x", desc)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['trained_on'\]"):
        save_task_model(EchoFMClassifier(enc, 2), tmp_path / "x", {k: v for k, v in desc.items() if k != "trained_on"})
    folder = save_task_model(EchoFMClassifier(enc, 2), tmp_path / "view", desc)
    # a task checkpoint of another task as the starting point of a run
    with pytest.raises(CheckpointError, match=r"view.*task 'view'.*but task 'ef' was expected"):
        finetune.run(config("ef", tmp_path / "r", f"init_from={folder}"), progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_task_model(tmp_path / "junk.safetensors")


def test_same_task_checkpoint_continues_training(tmp_path):
    first = finetune.run(config("segment", tmp_path / "a"), progress=False)
    assert first["task"] == "segment"
    finetune.run(config("segment", tmp_path / "b", f"init_from={tmp_path / 'a' / 'model'}", "optim.lr=0",
                        "optim.min_lr=0", "model.img_size=64"), progress=False)   # the checkpoint's shape wins
    a, b = (load_file(str(tmp_path / f / "model" / "model.safetensors")) for f in "ab")
    assert all(torch.equal(v, b[k]) for k, v in a.items())     # lr 0: the second run starts from the first
    assert read_task_description(tmp_path / "b" / "model")["training"]["init_from"] == "model"


@pytest.mark.parametrize("name,task,kind", [("view_tmed2", "view", "tmed2"), ("as_tmed2", "as", "tmed2"),
                                            ("segment_camus", "segment", "camus"), ("ef_echonet", "ef", "echonet"),
                                            ("ar_multiview", "ar", "ar_multiview")])
def test_paper_configs_are_valid_vit_l_settings(name, task, kind):
    from EchoFMEngine.models import make_config
    from EchoFMEngine.training.task_data import KIND_TASKS

    cfg = load_config(CONFIGS / f"finetune_{name}.yaml")
    m = make_config(cfg["model"])
    assert (cfg["task"], cfg["data"]["kind"]) == (task, kind) and task in KIND_TASKS[kind]
    assert (m.embed_dim, m.depth, m.img_size, m.num_frames, m.tubelet, m.patch_size) == (1024, 24, 224, 32, 4, 16)
    assert cfg["head"]["mode"] in ("full", "frozen") and cfg["run"]["steps"] >= 1000
