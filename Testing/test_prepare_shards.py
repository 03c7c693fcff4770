"""Sharded `prepare`: --shard i/N parts plus --merge (and torchrun with 2 gloo processes) give the same
cache as one process on the same tree: index rows, clip pixels, done and failed lists."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from EchoFMEngine.data.cache import ClipCache
from EchoFMEngine.data.prepare import ShardError, cli, parse_shard

from test_prepare import _rows as _csv

T, S = 16, 32
ARGS = ["--frames", str(T), "--size", str(S), "--shard-clips", "2", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Six sorted sources: four good phantoms, one too short for a full cycle, one unreadable."""
    from EchoFMEngine.clinical.phantoms import make_study, write_avi

    src = tmp_path_factory.mktemp("studies")
    for sub in ("site1", "site2"):
        (src / sub).mkdir()
    for i, name in enumerate(["site1/a.avi", "site1/b.avi", "site2/d.avi", "site2/e.avi"]):
        write_avi(make_study(n_frames=40, size=(64, 64), fps=30.0, heart_rate_bpm=120.0 + 8 * i, seed=i,
                             with_ecg=False), src / name)
    write_avi(make_study(n_frames=6, size=(64, 64), fps=30.0, heart_rate_bpm=60.0, seed=9, with_ecg=False),
              src / "site1" / "c_short.avi")
    (src / "site2" / "broken.mp4").write_bytes(b"\x00\x01 not a video")
    return src


@pytest.fixture(scope="module")
def single(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "cache"
    assert cli([str(tree), "--out", str(out), *ARGS]) == 0
    return out


def _same_cache(a, b):
    ra, rb = ClipCache(a), ClipCache(b)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("shard", "offset")} for r in rows]  # noqa: E731
    assert strip(ra.rows) == strip(rb.rows) and len(ra) >= 6
    for i in range(len(ra)):
        assert np.array_equal(ra.clip_uint8(i), rb.clip_uint8(i)), ra.rows[i]
    assert _csv(a / "done.csv") == _csv(b / "done.csv")
    assert _csv(a / "failed.csv") == _csv(b / "failed.csv")


def test_two_shards_then_merge_equal_one_process(tree, single, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert cli([str(tree), "--out", str(out), "--shard", "1/2", *ARGS]) == 0
    assert "[part 1/2] sources: 3 found" in capsys.readouterr().out
    assert cli(["--merge", "--out", str(out)]) == 2                      # part 0 not run yet
    assert "0/2 not finished" in capsys.readouterr().err
    assert cli([str(tree), "--out", str(out), "--shard", "0/2", *ARGS]) == 0
    assert cli(["--merge", "--out", str(out)]) == 0
    assert "merged 2 parts: 6 sources" in capsys.readouterr().out
    _same_cache(single, out)
    assert {r["source"] for r in _csv(out / "failed.csv")} == {"site1/c_short.avi", "site2/broken.mp4"}
    # Shard files are hard links into the parts (no copy), where the file system has them.
    first = ClipCache(out).rows[0]["shard"]
    assert os.path.samefile(out / first, out / "parts" / "part_000_of_002" / "shard_00000.npy")

    # Resume: a re-run part skips what it did; merging again gives the same cache.
    assert cli([str(tree), "--out", str(out), "--shard", "1/2", *ARGS]) == 0
    assert "3 found, 2 already done, 1 processed" in capsys.readouterr().out   # only the unreadable file again
    assert cli(["--merge", "--out", str(out)]) == 0
    _same_cache(single, out)


def test_bad_shard_specs_and_mixed_splits(tree, tmp_path, capsys):
    for bad in ("2/2", "x", "1/0", "-1/3"):
        with pytest.raises(ShardError):
            parse_shard(bad)
    assert parse_shard("3/4") == (3, 4)
    assert cli([str(tree), "--out", str(tmp_path / "o"), "--shard", "2/2", *ARGS]) == 2
    assert cli([str(tree), "--merge", "--out", str(tmp_path / "o")]) == 2
    out = tmp_path / "mixed"
    assert cli([str(tree), "--out", str(out), "--shard", "0/3", *ARGS]) == 0
    assert cli([str(tree), "--out", str(out), "--shard", "0/2", *ARGS]) == 0
    capsys.readouterr()
    assert cli(["--merge", "--out", str(out)]) == 2
    assert "different splits" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one_process(tree, single, tmp_path):
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "EchoFMEngine", "prepare", str(tree), "--out", str(out), *ARGS]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "merged 2 parts" in run.stdout
    _same_cache(single, out)
