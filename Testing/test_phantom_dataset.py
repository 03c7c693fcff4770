"""The phantom dataset of the registry: the items for fixed seeds equal those of the code before phantoms
moved into ``data/phantom.py`` (fingerprints recorded from that code), and fine-tuning, evaluation, label
efficiency and pretraining read phantoms through the registry like any other dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from EchoFMEngine.data import build_dataset, dataset_names
from EchoFMEngine.data.datasets import dataset_class, dataset_tasks
from EchoFMEngine.data.phantom import HELD_OUT_SEED, PROXY_LABELS, PROXY_NOTES, VIEWS, Phantoms, task_items
from EchoFMEngine.evaluation.cases import config_data_spec, parse_data_spec
from EchoFMEngine.models import make_config
from EchoFMEngine.tasks import TASK_NAMES
from EchoFMEngine.training.config import defaults_for
from EchoFMEngine.training.pretrain import build_dataset as pretrain_dataset
from EchoFMEngine.training.task_data import KIND_TASKS, build_task_data, task_labels

IMG, FRAMES = 32, 8

# Recorded from the code at commit 518ea61 (training.task_data.phantom_task_items(task, 2, 32, 8, seed) and
# training.data.PhantomClips(2, 8, 32, seed=5)) with fingerprint() below: a float tensor -> [sum, sum of it times
# fixed weights default_rng(123).random], an int tensor -> bincount, a bool tensor -> indices of True.
HEAD = {
    "ar:4": [{"ef": 45.885076, "label": 1, "seed": 4000, "severity": 2.5, "video": [10005.5179, 5011.1205], "view_valid": [0, 1, 2]}, {"ef": 55.803144, "label": 0, "seed": 4001, "severity": 1.5, "video": [6851.9884, 3408.0442], "view_valid": [0, 1]}],
    "as:3": [{"ef": 57.412766, "label": 0, "mask_valid": [0, 4, 6], "masks": [6981, 571, 422, 218], "seed": 3000, "spacing_mm": [6.235858, 6.235858], "video": [3231.1295, 1601.8432], "view": "A4C"}, {"ef": 42.208056, "label": 1, "mask_valid": [1, 5], "masks": [6913, 620, 416, 243], "seed": 3001, "spacing_mm": [6.235858, 6.235858], "video": [3271.8824, 1623.645], "view": "A2C"}],
    "ef:90210": [{"ef": 38.291711, "mask_valid": [3, 5], "masks": [6979, 646, 369, 198], "seed": 90210000, "spacing_mm": [6.235858, 6.235858], "video": [2943.6589, 1459.6487], "view": "A4C"}, {"ef": 54.858532, "mask_valid": [3, 5], "masks": [6887, 618, 439, 248], "seed": 90210001, "spacing_mm": [6.235858, 6.235858], "video": [3408.6354, 1686.7299], "view": "A2C"}],
    "pretrain:5": [{"index": 0, "video": [3191.4707, 1583.272]}, {"index": 1, "video": [3468.4001, 1727.2084]}],
    "segment:7": [{"ef": 39.240766, "mask_valid": [0, 2, 6], "masks": [6920, 629, 419, 224], "seed": 7000, "spacing_mm": [6.235858, 6.235858], "video": [3417.2471, 1696.837], "view": "A4C"}, {"ef": 44.991206, "mask_valid": [1, 4, 7], "masks": [6849, 627, 473, 243], "seed": 7001, "spacing_mm": [6.235858, 6.235858], "video": [3507.5766, 1745.0982], "view": "A2C"}],
    "view:1": [{"ef": 37.077107, "label": 1, "mask_valid": [2, 5], "masks": [6940, 630, 422, 200], "seed": 1000, "spacing_mm": [6.235858, 6.235858], "video": [3034.6471, 1503.9567], "view": "A4C"}, {"ef": 54.206501, "label": 0, "mask_valid": [1, 5], "masks": [7036, 592, 366, 198], "seed": 1001, "spacing_mm": [6.235858, 6.235858], "video": [3259.8707, 1621.7351], "view": "A2C"}]
}


def fingerprint(item: dict) -> dict:
    out = {}
    for k, v in item.items():
        if torch.is_tensor(v):
            a = v.numpy()
            if a.dtype == bool:
                out[k] = [int(i) for i in np.flatnonzero(a.ravel())]
            elif a.dtype.kind == "f":
                a = a.astype(np.float64)
                out[k] = [float(a.sum()), float((a * np.random.default_rng(123).random(a.shape)).sum())]
            else:
                out[k] = [int(x) for x in np.bincount(a.astype(np.int64).ravel())]
        elif isinstance(v, tuple):
            out[k] = [float(x) for x in v]
        else:
            out[k] = v
    return out


def assert_same(got: list, want: list):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = fingerprint(g)
        assert sorted(g) == sorted(w)
        for k, v in w.items():
            if isinstance(v, list) and v and isinstance(v[0], float) or isinstance(v, float):
                assert g[k] == pytest.approx(v, rel=1e-6, abs=1e-4), k
            else:
                assert g[k] == v, k


@pytest.mark.parametrize("key", sorted(k for k in HEAD if not k.startswith("pretrain")))
def test_task_items_for_a_fixed_seed_equal_the_old_code(key):
    task, seed = key.split(":")
    assert_same(task_items(task, 2, size=IMG, frames=FRAMES, seed=int(seed)), HEAD[key])


def test_pretraining_clips_equal_the_old_phantom_clips():
    cfg = defaults_for("pretrain")
    cfg["data"].update(n_studies=2, seed=5)
    ds = pretrain_dataset(cfg, make_config({"preset": "tiny", "img_size": IMG, "num_frames": FRAMES}))
    assert_same([ds[i] for i in range(len(ds))], HEAD["pretrain:5"])


def test_registered_with_its_tasks_splits_and_seeds():
    assert "phantom" in dataset_names() and dataset_class("phantom") is Phantoms
    assert set(dataset_tasks("phantom")) == {*TASK_NAMES, "pretrain"} and KIND_TASKS["phantom"] == TASK_NAMES
    # split k of config seed s holds studies (10 s + k) * 1000 + i; 'held_out' those of HELD_OUT_SEED
    for split, first in [("train", 21), ("val", 22), ("test", 23), ("held_out", HELD_OUT_SEED)]:
        ds = build_dataset("phantom", None, split=split, task="ef", n=2, seed=2, frames=FRAMES, size=IMG)
        assert [ds[i]["seed"] for i in range(2)] == [first * 1000, first * 1000 + 1]
    with pytest.raises(ValueError, match="phantom split 'nosuch'"):
        build_dataset("phantom", None, split="nosuch", task="ef", n=1, frames=FRAMES, size=IMG)
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("camus", None)


def test_fine_tuning_reads_phantoms_through_the_registry():
    data = defaults_for("as")["data"]
    data.update(n_train=2, n_val=1, n_test=0)
    td = build_task_data("as", data, FRAMES, IMG)
    assert (len(td.train), len(td.val), td.test) == (2, 1, None) and td.trained_on == "phantom"
    assert td.labels == PROXY_LABELS["as"] == task_labels("as", data) and td.notes == [PROXY_NOTES["as"]]
    assert task_labels("view", data) == VIEWS
    want = task_items("as", 2, size=IMG, frames=FRAMES, seed=10 * data["seed"] + 1)
    assert [int(td.train[i]["label"]) for i in range(2)] == [it["label"] for it in want]
    with pytest.raises(ValueError, match="n_val must be >= 1"):
        build_task_data("as", {**data, "n_val": 0}, FRAMES, IMG)


def test_evaluation_specs_of_phantoms():
    spec = parse_data_spec("phantom:3")
    assert (spec.kind, spec.n, spec.split) == ("phantom", 3, "held_out")
    assert spec.describe("test") == {"kind": "phantom", "n_studies": 3, "seed": HELD_OUT_SEED}
    data = defaults_for("view")["data"]
    assert config_data_spec({**data, "n_test": 5}).describe("test")["n_studies"] == 5   # label efficiency default
    assert config_data_spec({**data, "n_test": 0}).n == 16
    # a checkpoint's classes: views re-indexed by name, proxies only for a proxy checkpoint
    ds = build_dataset("phantom", None, split="held_out", task="view", n=2, frames=FRAMES, size=IMG,
                       classes=["PLAX", "A4C", "A2C"])
    assert [ds[i]["label"] for i in range(2)] == [1, 2] and [ds[i]["view"] for i in range(2)] == ["A4C", "A2C"]
    with pytest.raises(ValueError, match="proxy labels"):
        build_dataset("phantom", None, task="as", n=1, frames=FRAMES, size=IMG, classes=["no_AS", "AS"])
    with pytest.raises(ValueError, match="not among the checkpoint's classes"):
        build_dataset("phantom", None, task="view", n=2, frames=FRAMES, size=IMG, classes=["A4C"])
