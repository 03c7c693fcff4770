"""Layer-wise learning-rate decay (BEiT / MAE fine-tuning) for any encoder + head task model."""
from __future__ import annotations

import torch

from .optim import skips_decay


def layer_id(name: str, depth: int) -> int:
    """Depth of an encoder parameter for layer-wise lr decay: embeddings 0, block i -> i+1, rest depth+1."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups for a model with an ``encoder`` (an EchoFM) and head parameters elsewhere.

    Head parameters (everything outside ``encoder.``) get ``lr``; encoder block i gets
    ``lr * layer_decay**(depth - i)``, the embeddings ``lr * layer_decay**(depth + 1)``. No weight
    decay on biases, norms, tokens, position tables and view embeddings. Frozen parameters
    (``requires_grad=False``) are left out, so a frozen encoder is never touched by the optimiser.
    """
    depth = model.encoder.cfg.depth
    skip = model.encoder.no_weight_decay()
    groups: dict = {}
    for full, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if full.startswith("encoder."):
            name = full[len("encoder."):]
            lid, nd = layer_id(name, depth), skips_decay(name, p, skip)
        else:
            lid, nd = depth + 1, skips_decay(full, p) or "embed" in full.split(".")[-1]
        key = (lid, nd)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * layer_decay ** (depth + 1 - lid),
                           "weight_decay": 0.0 if nd else weight_decay, "layer_id": lid}
        groups[key]["params"].append(p)
    return list(groups.values())
