"""runtime.distributed.resolve_device: each torchrun process gets its own GPU; no GPU needed to test it."""
import subprocess
import sys

import pytest
import torch

from EchoFMEngine.runtime.distributed import resolve_device


def test_local_rank_picks_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda", device_count=4) == torch.device("cuda", 3)
    assert resolve_device("auto", device_count=4) == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=1, device_count=4) == torch.device("cuda", 1)


def test_more_processes_than_gpus_share_them_round_robin(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert resolve_device("cuda", device_count=2) == torch.device("cuda", 1)


def test_not_under_torchrun_is_gpu_zero(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda", device_count=2) == torch.device("cuda", 0)


def test_explicit_index_is_honoured_and_checked(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda:1", device_count=2) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="cuda:2.*2 GPU"):
        resolve_device("cuda:2", device_count=2)


def test_cpu_and_missing_cuda(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cpu", device_count=4) == torch.device("cpu")
    assert resolve_device("auto", device_count=0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda", device_count=0)


def test_runtime_package_imports_no_torch():
    code = "import sys, EchoFMEngine.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
