"""AdamW with decay-free biases, norms and tables; linear warm-up then cosine, stepped per update."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler


def skips_decay(name: str, p: torch.Tensor, skip: set = frozenset()) -> bool:
    """Biases, norms (1-D), and the names in ``skip`` (tokens, position tables) get no weight decay."""
    return p.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups(model: torch.nn.Module, weight_decay: float, skip: set = frozenset()) -> list[dict]:
    """Two groups: decayed weight matrices, and undecayed biases / norms / tokens / embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if skips_decay(name, p, skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256


def build_optimizer(model: torch.nn.Module, optim_cfg: dict, global_batch: int, skip: set = frozenset(),
                    fused: bool = False) -> torch.optim.AdamW:
    lr = scaled_lr(optim_cfg["base_lr"], global_batch)
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, optim_cfg["weight_decay"], skip), lr=lr,
                             betas=tuple(optim_cfg["betas"]), **kwargs)


def build_scheduler(optimizer, total_updates: int, optim_cfg: dict) -> CosineLRScheduler:
    """timm's cosine schedule in update units (call ``step_update(n)`` after each optimiser step)."""
    return CosineLRScheduler(optimizer, t_initial=max(total_updates, 1), lr_min=optim_cfg["min_lr"],
                             warmup_t=optim_cfg["warmup_steps"], warmup_lr_init=0.0, warmup_prefix=True,
                             t_in_epochs=False)
