"""Pretraining inputs: which clips, and in which order, step by step (exactly resumable). Phantom clips
are a registered dataset (:mod:`EchoFMEngine.data.phantom`)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.phantom import phantom_clip  # noqa: F401 (moved to data.phantom; old scripts import it here)


class Indexed(Dataset):
    """Adds each item's dataset index (the per-sample mask seed needs it) and drops ``meta``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return {"video": item["video"], "index": i}


def item_seed(seed: int, micro_step: int, index: int) -> int:
    """A seed for one sample at one micro-step that does not depend on rank or batch layout."""
    return int(np.random.SeedSequence([seed, micro_step, index]).generate_state(1)[0])


class StepBatchSampler(Sampler):
    """Endless batches for one process: micro-step ``g`` takes global slice ``g`` of a per-epoch
    permutation and this rank's share of it (``[rank::world]``). Stateless given the start
    micro-step, so a resumed run sees exactly the batches the killed run would have seen."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_micro_step: int = 0):
        self.n, self.bs, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.global_bs = batch_size * world
        if n < self.global_bs:
            raise ValueError(f"dataset has {n} clips, fewer than one global batch of {self.global_bs}")
        self.per_epoch = n // self.global_bs
        self.start = start_micro_step

    def batch_for(self, micro_step: int) -> list[int]:
        epoch, offset = divmod(micro_step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        chunk = perm[offset * self.global_bs:(offset + 1) * self.global_bs]
        return chunk[self.rank::self.world].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        g = self.start
        while True:
            yield self.batch_for(g)
            g += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len()
        return 2**31
