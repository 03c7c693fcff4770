"""The task registry (EchoFMEngine.tasks): every task builds its head, has its metrics, round-trips a
checkpoint and a models-folder entry; the structure label vocabulary is the only one; and no other
module spells out the task list again."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from EchoFMEngine import tasks
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.heads import ENCODER_UNUSED, MODEL_KINDS, build_new_task_model, new_head_config
from EchoFMEngine.models.registry import TASK_HELP, ModelStore
from EchoFMEngine.models.task_checkpoint import (TASK_KINDS, load_task_model, read_task_description,
                                                save_task_model)
from EchoFMEngine.tasks import TASK_NAMES, TASKS, get_task

ROOT = Path(__file__).resolve().parents[1]
SPECS = pytest.mark.parametrize("spec", TASKS, ids=TASK_NAMES)


def _labels(spec) -> list[str]:
    return list(spec.classes)


def _description(spec, cfg) -> dict:
    return {"task": spec.name, "labels": _labels(spec), "trained_on": "phantom",
            "input": {"frames": cfg.num_frames, "height": cfg.img_size, "width": cfg.img_size, "channels": 3,
                      "value_range": [0.0, 1.0], "layout": "[B, C, T, H, W]"},
            "preprocessing": {"sector_crop": True, "size": cfg.img_size, "frames_policy": spec.frames_policy}}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_echofm("tiny")


def test_registry_order_names_and_lookup():
    assert TASK_NAMES == ("view", "segment", "as", "ar", "ef")
    assert get_task("ef").name == "ef" and get_task("segment").kind == tasks.SEGMENTATION
    with pytest.raises(ValueError, match=r"unknown task 'rv'.*'view', 'segment', 'as', 'ar', 'ef'"):
        get_task("rv")
    with pytest.raises(ValueError, match="unknown task"):
        get_task(None)
    with pytest.raises(Exception):                      # frozen: a task cannot be changed at run time
        get_task("view").select_metric = "loss"


@SPECS
def test_every_task_builds_its_head_and_round_trips_a_checkpoint(spec, encoder, tmp_path):
    assert set(spec.heads) <= set(MODEL_KINDS) and TASK_KINDS[spec.name] == spec.heads
    assert spec.title and TASK_HELP[spec.name] == spec.title
    assert spec.select_metric in spec.metrics and isinstance(spec.higher_is_better, bool)
    assert spec.loss and spec.targets and spec.kind in tasks.KINDS
    labels = _labels(spec)
    assert len(labels) == (spec.n_outputs or len(labels)) >= 1
    model = build_new_task_model(encoder, spec.name, len(labels), tasks.HEAD_DEFAULTS,
                                 target_stats={"mean": 55.0, "std": 10.0})
    assert model.kind == spec.head_kind() == spec.heads[0]
    folder = save_task_model(model, tmp_path / spec.name, _description(spec, encoder.cfg))
    desc = read_task_description(folder)
    assert desc["task"] == spec.name and desc["labels"] == labels and desc["head"] == model.head_config()
    entry = ModelStore(tmp_path / "models").import_file(folder)
    assert entry["task"] == spec.name and entry["labels"] == labels
    twin = load_task_model(ModelStore(tmp_path / "models").get(spec.name), task=spec.name)
    assert twin.head_config() == model.head_config()
    skip = tuple(f"encoder.{u}" for u in ENCODER_UNUSED)          # the MAE decoder is never written
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    assert own and all(torch.equal(v, twin.state_dict()[k]) for k, v in own.items())


def test_head_options_pick_the_variant_and_the_config_defaults_come_from_the_registry(encoder):
    from EchoFMEngine.training.config import FINETUNE_DEFAULTS

    seg = get_task("segment")
    assert seg.head_kind({"frame_model": True}) == "frame_segmenter" and seg.head_kind({}) == "segmenter"
    model = build_new_task_model(encoder, "segment", 4, {"frame_model": True, "width": 8})
    assert model.kind == "frame_segmenter" and model.head.width == 8 and model.cfg.num_frames == 1
    assert new_head_config("ar", 2)["views"] == list(get_task("ar").views)
    assert {k: FINETUNE_DEFAULTS["head"][k] for k in tasks.HEAD_DEFAULTS} == tasks.HEAD_DEFAULTS
    with pytest.raises(ValueError, match="unknown task"):
        new_head_config("rv", 2)


def test_selection_metric_of_training_is_the_registry_s():
    from EchoFMEngine.training.task_eval import select_metric

    for spec in TASKS:
        assert select_metric(spec.name) == (spec.select_metric, spec.higher_is_better)


def test_one_structure_vocabulary_with_old_names_kept():
    from EchoFMEngine.clinical.phantoms import LABELS
    from EchoFMEngine.data.labels import SEG_CLASSES
    from EchoFMEngine.training.segment import STRUCTURES
    from EchoFMEngine.training.task_data import SEG_LABELS

    assert tasks.SEG_LABELS == ("background", "lv_cavity", "lv_myocardium", "la")
    assert SEG_CLASSES == list(tasks.SEG_LABELS) and SEG_LABELS == SEG_CLASSES
    assert LABELS is tasks.LABEL_VALUES and LABELS["lv_endo"] == LABELS["lv_cavity"] == 1
    assert LABELS["lv_myo"] == 2 and list(LABELS) == list(tasks.SEG_LABELS) and len(LABELS) == 4
    with pytest.raises(KeyError):
        LABELS["rv"]
    assert tasks.canonical_label("LV_endo") == "lv_cavity"
    with pytest.raises(ValueError, match="unknown structure label 'rv'"):
        tasks.canonical_label("rv")
    assert tasks.canonical_labels(["background", "lv_endo", "lv_myo", "la", "rv"]) == \
        ["background", "lv_cavity", "lv_myocardium", "la", "rv"]
    assert STRUCTURES == tasks.STRUCTURE_LABELS == {"lv_endo": (1,), "lv_epi": (1, 2), "la": (3,)}
    assert tasks.structures_for(2) == {"lv_endo": (1,)} and tasks.structures_for(4) == STRUCTURES
    assert sorted(tasks.DRAW_ORDER) == sorted(s.name for s in tasks.STRUCTURES)
    assert tasks.LABEL_TEXT == "0 background, 1 LV cavity, 2 LV myocardium, 3 LA"


def test_a_checkpoint_with_the_old_label_names_loads_with_the_canonical_ones(encoder, tmp_path):
    spec = get_task("segment")
    model = build_new_task_model(encoder, "segment", 4, {"width": 8})
    desc = {**_description(spec, encoder.cfg), "labels": ["background", "lv_endo", "lv_myo", "la"]}
    folder = save_task_model(model, tmp_path / "old", desc)
    assert read_task_description(folder)["labels"] == list(tasks.SEG_LABELS)
    assert load_task_model(folder, task="segment").description["labels"] == list(tasks.SEG_LABELS)


def test_the_slicer_library_lists_the_registry_s_tasks_segmentation_first():
    sys.path.insert(0, str(ROOT / "EchoFMSlicer"))
    try:
        from EchoFMSlicerLib import logic
    finally:
        sys.path.remove(str(ROOT / "EchoFMSlicer"))
    assert logic.TASKS == ["segment", "view", "as", "ar", "ef"] and sorted(logic.TASKS) == sorted(TASK_NAMES)
    with pytest.raises(AttributeError):
        logic.NOT_A_NAME


def _task_literals(source: str):
    """(line, values) of every tuple/list/set literal of strings in ``source`` naming every task."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and \
                all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            values = [e.value for e in node.elts]
            if set(TASK_NAMES) <= set(values):
                yield node.lineno, values


def test_no_other_module_spells_out_the_task_list():
    """Adding a task touches EchoFMEngine/tasks.py only: nowhere else lists all the tasks by name."""
    files = [p for folder in ("EchoFMEngine", "EchoFMSlicer") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50
    found = [f"{p.relative_to(ROOT)}:{line} {values}" for p in files if p != ROOT / "EchoFMEngine" / "tasks.py"
             for line, values in _task_literals(p.read_text())]
    assert not found, "task lists outside EchoFMEngine/tasks.py (use EchoFMEngine.tasks.TASK_NAMES):\n" + \
        "\n".join(found)
    assert list(_task_literals((ROOT / "EchoFMEngine" / "tasks.py").read_text())) == []   # built from TASKS
    assert [line for line, _ in _task_literals('A = 1\nT = ["ef", "ar", "as", "segment", "view", "x"]')] == [2]
