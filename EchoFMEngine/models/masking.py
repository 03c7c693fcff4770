"""Token masking for the video MAE (paper Sec. III-A).

Every strategy returns ``ids_keep`` ``[B, K]``: the *global* indices of visible tokens in
ascending order (token ``(t, s)`` is ``t * L + s``, time-major), so position embeddings,
projector grouping and the decoder's scatter all use the true positions. At ratio 0 every
strategy keeps all tokens in their original order.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def _noise(shape: tuple, device, generator: Generators) -> torch.Tensor:
    """Uniform noise ``shape``; a list of generators draws each batch row from its own generator,
    so a sample's mask depends only on its own seed (same masks on 1 or N processes)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, device=device, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.rand(shape[1:], generator=g).to(device) for g in generator])


def _keep_lowest(noise: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` smallest noise values along the last axis, in ascending index order."""
    return noise.argsort(dim=-1)[..., :keep].sort(dim=-1).values


def random_masking(batch: int, t_grid: int, n_spatial: int, ratio: float, *,
                   device=None, generator: Generators = None) -> torch.Tensor:
    """Independent random masking over all tokens (MAE / VideoMAE baseline)."""
    n = t_grid * n_spatial
    keep = int(n * (1.0 - ratio))
    noise = _noise((batch, n), device, generator)
    return _keep_lowest(noise, keep)


def uniform_frame_masking(batch: int, t_grid: int, n_spatial: int, ratio: float, *,
                          device=None, generator: Generators = None) -> torch.Tensor:
    """Every temporal index keeps the same number of tokens, chosen independently per index."""
    keep = int(n_spatial * (1.0 - ratio))
    noise = _noise((batch, t_grid, n_spatial), device, generator)
    spatial = _keep_lowest(noise, keep)                                   # [B, T, k]
    offsets = torch.arange(t_grid, device=spatial.device).view(1, t_grid, 1) * n_spatial
    return (spatial + offsets).reshape(batch, t_grid * keep)


def consistent_masking(batch: int, t_grid: int, n_spatial: int, ratio: float, *,
                       device=None, generator: Generators = None) -> torch.Tensor:
    """Spatio-temporal consistent masking: one spatial mask shared by every temporal index."""
    keep = int(n_spatial * (1.0 - ratio))
    noise = _noise((batch, n_spatial), device, generator)
    spatial = _keep_lowest(noise, keep)                                   # [B, k]
    offsets = torch.arange(t_grid, device=spatial.device).view(1, t_grid, 1) * n_spatial
    return (spatial.unsqueeze(1) + offsets).reshape(batch, t_grid * keep)


MASKING = {
    "random": random_masking,
    "uniform": uniform_frame_masking,
    "consistent": consistent_masking,
}


def make_ids_keep(kind: str, batch: int, t_grid: int, n_spatial: int, ratio: float, *,
                  device=None, generator: Generators = None) -> torch.Tensor:
    """Visible-token indices ``[B, K]`` for masking strategy ``kind``."""
    if kind not in MASKING:
        raise ValueError(f"unknown mask type {kind!r}; choose from {sorted(MASKING)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return MASKING[kind](batch, t_grid, n_spatial, ratio, device=device, generator=generator)


def mask_from_ids_keep(ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Binary mask ``[B, N]``: 1 where a token was removed, 0 where it is visible."""
    mask = torch.ones(ids_keep.shape[0], num_tokens, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)
