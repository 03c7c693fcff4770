"""Fine-tuning under DDP (2 gloo processes on CPU, as torchrun would start them): the same trajectory
as one process, validation and test over the whole split, only rank 0 writes, and a SIGKILLed run
resumed on 2 processes ends exactly where an uninterrupted one does."""
from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from EchoFMEngine.training import finetune
from EchoFMEngine.training.config import load_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# n_val=5 splits 3 + 2 over the ranks: metrics over rank 0's block alone would count 3
SMALL = ["run.steps=6", "run.eval_every=3", "run.ckpt_every=2", "run.batch_size=4", "run.log_every=1",
         "run.keep_last=5", "data.n_train=8", "data.n_val=5", "data.n_test=3", "run.device=cpu"]


def view_config(out: Path) -> dict:
    return load_config(finetune.CONFIGS / "finetune_view.yaml", [f"run.out={out}", *SMALL])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outs: list, results: str, resume: bool, kill_at: int) -> None:
    """One process of a torchrun-style launch: env:// rendezvous, then the ordinary entry point."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def on_step(step):
        if rank == 0 and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)        # no clean-up of any kind, as a crash or OOM kill

    metrics = finetune.run(view_config(Path(outs[rank])), resume=resume, progress=False,
                           on_step=on_step if kill_at else None)
    Path(results, f"rank{rank}.json").write_text(json.dumps(metrics))


def launch(tmp: Path, outs: list, resume: bool = False, kill_at: int = 0) -> list:
    """Run 2 ranks; their returned metrics (a killed launch raises ProcessExitedException)."""
    results = tmp / f"results_{len(list(tmp.glob('results_*')))}"
    results.mkdir()
    # fork: the children inherit the imported modules (a spawned child re-imports torch, ~10 s per launch)
    mp.start_processes(_worker, args=(2, _free_port(), [str(o) for o in outs], str(results), resume, kill_at),
                       nprocs=2, join=True, start_method="fork")
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted 2-process run; rank 1 is pointed at its own run.out, which must stay absent."""
    tmp = tmp_path_factory.mktemp("ddp")
    ranks = launch(tmp, [tmp / "run", tmp / "rank1_out"])
    return tmp, ranks


def test_two_processes_follow_one_process_and_only_rank0_writes(two_process_run, tmp_path, one_torch_thread):
    tmp, (m0, m1) = two_process_run
    one = finetune.run(view_config(tmp_path / "one"), progress=False)
    assert m0["world_size"] == 2 and one["world_size"] == 1
    # the same samples, so the same trajectory (to float rounding of the split batch)
    assert [r["step"] for r in m0["train_history"]] == [r["step"] for r in one["train_history"]]
    for a, b in zip(m0["train_history"], one["train_history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6) and a["lr"] == pytest.approx(b["lr"])
    # validation and test over the whole split (5 and 3 studies), equal to one process
    assert m0["val"]["n"] == one["val"]["n"] == 5 and m0["test"]["n"] == one["test"]["n"] == 3
    assert m0["val"]["accuracy"] == one["val"]["accuracy"]
    assert m0["val"]["loss"] == pytest.approx(one["val"]["loss"], rel=1e-4)
    assert m0["best_step"] == one["best_step"]
    assert m1["val"] == m0["val"] and m1["test"] == m0["test"]         # every rank agrees
    # only rank 0 wrote: rank 1's own run.out was never created
    assert not (tmp / "rank1_out").exists()
    assert json.loads((tmp / "run" / "metrics.json").read_text())["val"] == m0["val"]
    assert (tmp / "run" / "model" / "model.safetensors").is_file()
    state = torch.load(sorted((tmp / "run" / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2          # each rank's generators kept


def test_sigkill_then_resume_on_two_processes_is_exact(two_process_run):
    tmp, (full, _) = two_process_run
    cut = tmp / "cut"
    with pytest.raises(mp.ProcessExitedException):
        launch(tmp, [cut, cut], kill_at=4)                              # after the step-4 checkpoint
    assert not (cut / "model").exists() and not (cut / "metrics.json").exists()
    resumed, _ = launch(tmp, [cut, cut], resume=True)
    assert resumed["resumed_from"] == 4
    for key in ("val", "test", "train_history", "val_history", "best_step"):
        assert resumed[key] == full[key], key
    a, b = (load_file(str(f / "model" / "model.safetensors")) for f in (tmp / "run", cut))
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def test_global_batch_must_split_over_the_processes(tmp_path):
    from EchoFMEngine.runtime import distributed
    from EchoFMEngine.training.config import ConfigError

    info = distributed.DistInfo(rank=0, world_size=3)
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        finetune._run(view_config(tmp_path / "r"), info, progress=False)


def test_rank_blocks_cover_the_split_in_order_and_merge_back():
    from EchoFMEngine.runtime import distributed
    from EchoFMEngine.training.task_eval import merge_predictions

    for n, world in ((5, 2), (1, 2), (7, 3), (0, 2)):
        blocks = [distributed.shard_range(n, distributed.DistInfo(rank=r, world_size=world)) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))
    parts = [{"y": torch.tensor([0, 1]).numpy(), "pred": [1.0, 2.0]}, {}, {"y": torch.tensor([1]).numpy(),
                                                                           "pred": [3.0]}]
    merged = merge_predictions(parts)
    assert merged["y"].tolist() == [0, 1, 1] and merged["pred"] == [1.0, 2.0, 3.0]


def test_non_finite_check_names_the_first_bad_loss():
    from EchoFMEngine.runtime import distributed

    info = distributed.DistInfo()
    assert distributed.all_finite([torch.tensor(1.0), torch.tensor(2.0)], info) == (True, -1)
    assert distributed.all_finite([torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))],
                                  info) == (False, 1)
    assert distributed.all_finite([], info) == (True, -1)


def test_a_locked_run_folder_is_refused_before_any_work(tmp_path):
    from EchoFMEngine.atomic import LockedError
    from EchoFMEngine.training import checkpointing

    out = tmp_path / "run"
    lock = checkpointing.run_lock(out, "fine-tuning")
    try:
        with pytest.raises(LockedError):
            finetune.run(view_config(out), progress=False)
        assert not (out / "config.yaml").exists()
    finally:
        lock.release()
