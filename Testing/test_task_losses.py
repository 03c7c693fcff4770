"""The fine-tuning loss is the one a task's registry entry names (Task.loss), computed on the item keys
it names (Task.targets): the registry is the one place that says it."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from EchoFMEngine.tasks import TASKS, get_task
from EchoFMEngine.training import task_eval


def test_the_loss_is_the_one_the_registry_names_on_the_targets_it_names(monkeypatch):
    """task_loss dispatches on Task.loss and reads Task.targets: rename a target in the registry entry and
    the loss reads the new key (and fails without it); an undeclared loss is a clear error."""
    assert {t.loss for t in TASKS} <= set(task_eval.LOSSES)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    grade = torch.tensor([0, 1, 1])
    spec = replace(get_task("view"), targets=("grade",))
    monkeypatch.setattr(task_eval, "get_task", lambda name: spec)
    loss = task_eval.task_loss(lambda video: logits, "view", {"video": torch.zeros(3, 1), "grade": grade})
    assert torch.allclose(loss, F.cross_entropy(logits, grade))
    with pytest.raises(KeyError, match="grade"):
        task_eval.task_loss(lambda video: logits, "view", {"video": torch.zeros(3, 1), "label": grade})
    spec = replace(get_task("view"), loss="focal")
    with pytest.raises(ValueError, match="focal"):
        task_eval.task_loss(lambda video: logits, "view", {"video": torch.zeros(3, 1), "label": grade})
