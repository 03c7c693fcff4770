"""`prepare` CLI and the clip cache: shards, index, resume, failures, memory-mapped reading."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from EchoFMEngine.data.cache import CacheWriter, ClipCache, bench_cache, load_index
from EchoFMEngine.data.prepare import cli

T, S = 16, 48


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    from EchoFMEngine.clinical.phantoms import make_study, write_avi, write_dicom

    src = tmp_path_factory.mktemp("studies")
    (src / "site1").mkdir()
    (src / "site2" / "deep").mkdir(parents=True)
    for i, name in enumerate(["site1/a.avi", "site2/deep/b.avi"]):
        write_avi(make_study(n_frames=60, size=(96, 96), fps=30.0, heart_rate_bpm=115.0 + 10 * i, seed=i,
                             with_ecg=False), src / name)
    write_dicom(make_study(view="A2C", n_frames=50, size=(96, 96), fps=30.0, heart_rate_bpm=120.0, seed=7),
                src / "site1" / "c.dcm")
    (src / "site2" / "broken.mp4").write_bytes(b"\x00\x01 not a video")
    return src


def test_prepare_builds_a_cache_and_resumes(source_tree, tmp_path, capsys):
    out = tmp_path / "cache"
    args = [str(source_tree), "--out", str(out), "--frames", str(T), "--size", str(S), "--shard-clips", "3",
            "--no-progress"]
    assert cli(args + ["--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "failed: 1" in text and "site2/broken.mp4" in text

    cfg = json.loads((out / "cache.json").read_text())
    assert (cfg["frames"], cfg["size"]) == (T, S)
    index = _rows(out / "index.csv")
    assert {r["source"] for r in index} == {"site1/a.avi", "site1/c.dcm", "site2/deep/b.avi"}
    assert all(r["full_cycle"] == "1" for r in index)
    assert all(not r["source"].startswith("/") and str(source_tree) not in r["source"] for r in index)
    failed = _rows(out / "failed.csv")
    assert [r["source"] for r in failed] == ["site2/broken.mp4"] and failed[0]["reason"]
    assert str(source_tree) not in failed[0]["reason"]
    n_clips = len(index)
    per_source = {s: sum(r["source"] == s for r in index) for s in {r["source"] for r in index}}
    assert n_clips >= 6 and all(n >= 2 for n in per_source.values())  # 50-60 frames at ~120 bpm: >= 3 cycles
    shards = sorted(out.glob("shard_*.npy"))
    assert sum(len(np.load(p, mmap_mode="r")) for p in shards) == n_clips
    arr = np.load(shards[0], mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint8 and arr.shape[1:] == (T, S, S, 3)

    ds = ClipCache(out)
    assert len(ds) == n_clips
    item = ds[0]
    assert item["video"].shape == (3, T, S, S) and item["video"].dtype == torch.float32
    assert 0 <= item["video"].min() and item["video"].max() <= 1 and item["video"].mean() > 0.02
    assert item["meta"]["full_cycle"] is True and item["meta"]["fps"] > 0
    r0 = ds.rows[0]
    assert torch.equal((item["video"] * 255).round().byte().permute(1, 2, 3, 0),
                       torch.from_numpy(np.load(out / r0["shard"])[r0["offset"]]))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)))
    assert batch["video"].shape == (2, 3, T, S, S)

    # Re-run: everything done is skipped, the broken file is retried and still reported.
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    assert cli(args + ["--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "3 already done, 1 processed" in text and "clips: 0 new" in text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npy")} == mtimes
    assert len(_rows(out / "index.csv")) == n_clips

    # A new source: only it is processed and appended in a new shard.
    from EchoFMEngine.clinical.phantoms import make_study, write_avi

    write_avi(make_study(n_frames=60, size=(96, 96), heart_rate_bpm=120.0, seed=11, with_ecg=False),
              source_tree / "site1" / "new.avi")
    try:
        assert cli(args + ["--workers", "1"]) == 0
        assert "4 already done" not in capsys.readouterr().out
        rows, done = load_index(out)
        assert "site1/new.avi" in done and len(rows) > n_clips
        assert len(ClipCache(out)) == len(rows)
        with pytest.raises(ValueError, match="existing cache holds"):
            CacheWriter(out, frames=T + 1, size=S)
    finally:
        (source_tree / "site1" / "new.avi").unlink()


def test_interrupted_cache_is_cleaned_up_on_resume(tmp_path):
    out = tmp_path / "cache"
    w = CacheWriter(out, frames=4, size=8, shard_clips=2)
    clip = np.full((2, 4, 8, 8, 3), 7, np.uint8)
    w.add("x/one.avi", clip, [{"start_frame": 0, "end_frame": 4, "fps": 30.0, "full_cycle": True}] * 2)
    w.add("x/two.avi", clip[:1], [{"start_frame": 2, "end_frame": 6, "fps": 30.0, "full_cycle": False}])
    w.add("x/empty.avi", clip[:0], [])
    w.close()
    assert load_index(out)[1] == {"x/one.avi": 2, "x/two.avi": 1, "x/empty.avi": 0}
    # Simulate a crash: an orphan shard, a temp file, and a torn index line without its done row.
    np.save(out / "shard_00007.npy", clip)
    (out / "shard_00008.npy.123.tmp").write_bytes(b"partial")
    with open(out / "index.csv", "a") as fh:
        fh.write("shard_00007.npy,0,x/three.avi,0,4,30.0,1\nshard_00007.npy,1,x/thr")
    w2 = CacheWriter(out, frames=4, size=8)
    assert set(w2.done) == {"x/one.avi", "x/two.avi", "x/empty.avi"}
    assert not (out / "shard_00007.npy").exists() and not list(out.glob("*.tmp"))
    ds = ClipCache(out)
    assert len(ds) == 3 and ds[2]["meta"]["full_cycle"] is False
    assert float(ds[0]["video"][0, 0, 0, 0]) == pytest.approx(7 / 255)
    w2.add("x/three.avi", clip[:1], [{"start_frame": 0, "end_frame": 4, "fps": 30.0, "full_cycle": True}])
    w2.close()
    assert len(ClipCache(out)) == 4
    with pytest.raises(ValueError, match="clips of shape"):
        w2.add("x/bad.avi", np.zeros((1, 3, 8, 8, 3), np.uint8), [{}])


def test_cache_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cache.json"):
        ClipCache(tmp_path)
    assert cli([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2


def test_bench_cache_reports_frames_per_second(tmp_path):
    fps = bench_cache(tmp_path / "bench", n_clips=6, frames=8, size=32, batch_size=2)
    assert fps > 100
    assert len(ClipCache(tmp_path / "bench")) == 6
    assert bench_cache(tmp_path / "bench", batch_size=3) > 100  # an existing cache is read as is
    raw = ClipCache(tmp_path / "bench", uint8=True)[1]["video"]
    assert raw.dtype == torch.uint8 and torch.equal(raw.float() / 255, ClipCache(tmp_path / "bench")[1]["video"])


def test_bench_io_format_round_trips_frames(tmp_path):
    from EchoFMEngine.data.cache import bench_io_format

    name, write, read = bench_io_format()
    frames = np.random.default_rng(0).integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    path = write(frames, 50.0, tmp_path)
    assert read(path) == 5
    clip = ClipCache(path.parent).clip_uint8(0)
    assert clip.shape == (5, 30, 30, 3) and np.array_equal(clip[:, :20, :30], frames) and not clip[:, 20:].any()
