"""torchrun-aware process group set-up (NCCL on CUDA, gloo on CPU, one process when not launched), with the
collectives, sharding and per-rank generator states that training, analysis and data preparation share."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: Optional[int] = None, device_count: Optional[int] = None) -> torch.device:
    """The device ``name`` means for this process. ``auto`` picks CUDA when it works, else CPU. ``cuda``
    (or ``auto`` on a GPU machine) is this process's GPU: ``cuda:LOCAL_RANK`` under torchrun (wrapped
    modulo the GPU count, so more processes than GPUs share them round-robin), else ``cuda:0``. An
    explicit ``cuda:N`` is honoured as given. ``local_rank`` defaults to ``$LOCAL_RANK``;
    ``device_count`` to ``torch.cuda.device_count()`` (given in tests, which have no GPU)."""
    if device_count is None:
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        name = "cuda" if device_count else "cpu"
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if device_count == 0:
        raise RuntimeError(f"device {name!r} requested but CUDA is not available (use device=cpu or auto)")
    if dev.index is not None:
        if dev.index >= device_count:
            raise RuntimeError(f"device {name!r} requested but this machine has {device_count} GPU(s) "
                               f"(cuda:0 to cuda:{device_count - 1})")
        return dev
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank % device_count)


def enable_fast_math(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (fp32 runs use the tensor cores)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def setup(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``x`` over processes (for logging)."""
    if not info.enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / info.world_size


# ------------------------------------------------------------------ shared by pretraining and fine-tuning
def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` when not distributed)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s ``obj`` on every process."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as plain types (bytes, ints, lists), so
    they survive ``all_gather_object`` and a ``weights_only`` load."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes_state(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(_bytes_state(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_state(b) for b in state["cuda"]])


def gather_rng_states(info: DistInfo) -> list:
    """Every rank's generator states (checkpointed so each rank resumes with its own)."""
    return gather_objects(rng_state(), info)


def restore_rng_state(saved, info: DistInfo) -> None:
    """This rank's states from a checkpoint's ``rng`` (a per-rank list; an old single dict, or a
    run resumed on more ranks than it was saved with, falls back to rank 0's)."""
    if isinstance(saved, dict):
        set_rng_state(saved)
    else:
        set_rng_state(saved[info.rank] if info.rank < len(saved) else saved[0])


def all_finite(values: list, info: DistInfo) -> tuple[bool, int]:
    """(True, -1) when every tensor in ``values`` is finite on every rank, else (False, position of
    the first non-finite one on any rank). One host sync (and one all-reduce) for the whole list."""
    if not values:
        return True, -1
    x = torch.stack([v.detach().float().reshape(()) for v in values])
    bad = ~torch.isfinite(x)
    first = torch.where(bad.any(), bad.float().argmax(), torch.tensor(len(values), device=x.device))
    if info.enabled:
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    i = int(first)
    return i >= len(values), (i if i < len(values) else -1)


def shard_range(n: int, info: DistInfo) -> range:
    """This rank's contiguous block of ``range(n)`` (blocks concatenated in rank order give
    ``range(n)`` back, so gathered predictions keep the single-process order)."""
    per = -(-n // info.world_size)
    return range(min(n, info.rank * per), min(n, (info.rank + 1) * per))
