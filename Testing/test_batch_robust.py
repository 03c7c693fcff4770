"""Batches that never lose results (issue 20): failures isolated, atomic outputs, one writer per folder,
resume, disk full, NaN/truncated inputs, exit codes. Tiny synthetic .npy cines, no models."""
from __future__ import annotations

import csv
import errno
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from EchoFMEngine.analysis import batch
from EchoFMEngine.analysis.batch import OutputFolderError, analyze_paths
from EchoFMEngine.analysis.outputs import study_id
from EchoFMEngine.atomic import LOCK_NAME, LockedError, RunLock
from EchoFMEngine.cine import CineReadError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def make_cines(folder: Path, n: int, T: int = 20, size: int = 40) -> list[Path]:
    """``n`` beating-disc clips as uint8 .npy files (different phase each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    paths = []
    for i in range(n):
        r = size / 5 + size / 10 * np.cos(2 * np.pi * np.arange(T) / 10 + i)
        f = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2)[None] < (r ** 2)[:, None, None]) * 200.0
        f = f + rng.random((T, size, size)) * 30
        p = folder / f"s{i:02d}.npy"
        np.save(p, f.astype(np.uint8))
        paths.append(p)
    return paths


def bomb_png(path: Path, w: int = 30000, h: int = 30000) -> Path:
    """A 100-byte PNG whose header declares w x h pixels (PIL raises DecompressionBombError)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def ids_of(files) -> list[str]:
    """The study ids a run gives these inputs, in input order (however ids are derived)."""
    taken: set = set()
    return [study_id(Path(f), taken) for f in files]


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def no_models(tmp_path):
    d = tmp_path / "no_models"
    d.mkdir()
    return d


def consistent(out: Path) -> tuple[list, list]:
    """results.csv parses whole; each row has a complete study folder; no half folders; no duplicates."""
    text = (out / "results.csv").read_text() if (out / "results.csv").exists() else ""
    assert not text or text.endswith("\n"), "torn last line in results.csv"
    rs = rows(out / "results.csv") if text else []
    ids = [r["study_id"] for r in rs]
    assert len(ids) == len(set(ids)), f"duplicate rows {ids}"
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in folders:
        d = json.loads((out / name / "result.json").read_text())       # complete or absent
        if d.get("segmentation") and d["segmentation"].get("file"):
            assert (out / name / d["segmentation"]["file"]).stat().st_size > 0
    assert set(ids) <= set(folders), f"rows without a folder: {set(ids) - set(folders)}"
    return ids, folders


# ------------------------------------------------------------------ 1. any exception isolated
def test_any_exception_of_one_study_is_isolated_and_the_batch_goes_on(tmp_path, no_models, monkeypatch):
    files = make_cines(tmp_path / "in", 3)
    bomb = bomb_png(tmp_path / "in" / "huge.png")
    real = batch.analyze

    def lying_model(cine, **kw):             # what a checkpoint lying about its task did in pipeline.py
        if cine.source.file_name == "s01.npy":
            raise IndexError("index 7 is out of bounds for axis 0 with size 4")
        return real(cine, **kw)
    monkeypatch.setattr(batch, "analyze", lying_model)
    inputs = [files[0], bomb, files[1], files[2]]
    ids = ids_of(inputs)
    report = analyze_paths(inputs, tmp_path / "out", models=no_models, progress=False, summary=False)
    assert report["done"] == [ids[0], ids[3]]
    failed = rows(tmp_path / "out" / "failed.csv")
    assert len(failed) == 2
    assert "DecompressionBombError" in failed[0]["reason"] or "decompression" in failed[0]["reason"].lower()
    assert failed[1]["reason"].startswith("IndexError")
    assert [r["study_id"] for r in rows(tmp_path / "out" / "results.csv")] == [ids[0], ids[3]]


def test_rows_are_on_disk_as_each_study_finishes(tmp_path, no_models, monkeypatch):
    """A crash (here an interrupt the batch does not catch) at study 3 keeps studies 1 and 2."""
    files = make_cines(tmp_path / "in", 4)
    real = batch.analyze

    def crash_at_third(cine, **kw):
        if cine.source.file_name == "s02.npy":
            raise KeyboardInterrupt
        return real(cine, **kw)
    monkeypatch.setattr(batch, "analyze", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        analyze_paths(files, tmp_path / "out", models=no_models, progress=False, summary=False)
    ids, folders = consistent(tmp_path / "out")
    assert ids == folders == ids_of(files)[:2]
    assert not (tmp_path / "out" / LOCK_NAME).exists()      # released on the way out


# ------------------------------------------------------------------ 2. disk full
def test_disk_full_stops_after_the_current_study_with_valid_csvs(tmp_path, no_models, monkeypatch):
    files = make_cines(tmp_path / "in", 4)
    calls = {"n": 0}

    def fill_disk(result, out, sid, cine=None, summary=True):
        calls["n"] += 1
        if calls["n"] == 3:
            (Path(out) / f".{sid}.tmp-{os.getpid()}").mkdir(exist_ok=True)
            (Path(out) / f".{sid}.tmp-{os.getpid()}" / "masks.nrrd").write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(result, out, sid, cine=cine, summary=summary)
    real_write = batch.write_study
    monkeypatch.setattr(batch, "write_study", fill_disk)
    report = analyze_paths(files, tmp_path / "out", models=no_models, progress=False, summary=False)
    want = ids_of(files)
    assert report["stopped"] and "disk space" in report["stopped"] and report["done"] == want[:2]
    ids, folders = consistent(tmp_path / "out")
    assert ids == folders == want[:2]
    assert [f["reason"] for f in rows(tmp_path / "out" / "failed.csv")] == ["no space left on device"]
    # s03 was never started: the run stopped; the same command resumes once there is room
    monkeypatch.setattr(batch, "write_study", real_write)
    again = analyze_paths(files, tmp_path / "out", models=no_models, progress=False, summary=False)
    assert again["skipped"] == want[:2] and again["done"] == want[2:]
    assert [r["study_id"] for r in rows(tmp_path / "out" / "results.csv")] == want
    assert not (tmp_path / "out" / "failed.csv").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_on_a_real_small_tmpfs(tmp_path, no_models):
    out = tmp_path / "small"
    if not _mount_tmpfs(out, "300k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission in this container)")
    try:
        files = make_cines(tmp_path / "in", 12, T=40, size=96)
        r = subprocess.run([sys.executable, "-m", "EchoFMEngine", "analyze", *map(str, files), "--out", str(out),
                            "--models", str(no_models)], capture_output=True, text=True, env=ENV, cwd=REPO,
                           timeout=600)
        assert r.returncode == 1, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "disk space" in r.stderr
        ids, folders = consistent(out)
        assert ids and set(ids) == set(folders)
        failed = rows(out / "failed.csv") if (out / "failed.csv").exists() else []
        assert all(f["reason"] for f in failed)
        assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.name != LOCK_NAME]
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


# ------------------------------------------------------------------ 3. one writer, resume or refuse
def test_a_second_writer_is_refused_naming_the_first_and_a_stale_lock_is_taken_over(tmp_path, no_models):
    files = make_cines(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                 "what": "analyze", "started": "now"}))
        with pytest.raises(OutputFolderError, match=f"pid {holder.pid}"):
            analyze_paths(files, out, models=no_models, progress=False, summary=False)
        assert batch.cli([str(files[0]), "--out", str(out), "--models", str(no_models)]) == 2
    finally:
        holder.kill()
        holder.wait()
    report = analyze_paths(files, out, models=no_models, progress=False, summary=False)   # holder gone: stale
    assert report["done"] == ids_of(files) and not (out / LOCK_NAME).exists()


def test_two_concurrent_analyze_processes_never_mix(tmp_path, no_models):
    files = make_cines(tmp_path / "in", 2)
    out = tmp_path / "out"
    with RunLock(out, "analyze"):          # this test process is the first writer
        r = subprocess.run([sys.executable, "-m", "EchoFMEngine", "analyze", str(tmp_path / "in"), "--out", str(out),
                            "--models", str(no_models), "--no-summary"], capture_output=True, text=True, env=ENV,
                           cwd=REPO, timeout=300)
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "results.csv").exists()


def test_rerun_resumes_the_same_run_and_refuses_another(tmp_path, no_models):
    files = make_cines(tmp_path / "in", 3)
    out = tmp_path / "out"
    first = analyze_paths(files[:2], out, models=no_models, progress=False, summary=False)
    before = (out / "results.csv").read_bytes()
    again = analyze_paths(files[:2], out, models=no_models, progress=False, summary=False)
    assert first["done"] == ids_of(files[:2]) == again["skipped"] and again["done"] == []
    assert (out / "results.csv").read_bytes() == before
    with pytest.raises(OutputFolderError, match="another analysis run"):
        analyze_paths(files, out, models=no_models, progress=False, summary=False)
    with pytest.raises(OutputFolderError, match="another analysis run"):
        analyze_paths(files[:2], out, models=no_models, progress=False, summary=False, segment="all")
    old = tmp_path / "old"                  # a folder with results from before run files existed
    old.mkdir()
    (old / "results.csv").write_text("study_id\nx\n")
    with pytest.raises(OutputFolderError, match="earlier run"):
        analyze_paths(files, old, models=no_models, progress=False, summary=False)


def test_a_study_that_lost_its_row_gets_it_back_on_resume(tmp_path, no_models):
    files = make_cines(tmp_path / "in", 2)
    out = tmp_path / "out"
    analyze_paths(files, out, models=no_models, progress=False, summary=False)
    full = rows(out / "results.csv")
    text = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(text[:2]) + text[2][:10])      # kill between rename and append
    analyze_paths(files, out, models=no_models, progress=False, summary=False)
    assert rows(out / "results.csv") == full


def test_two_trainings_into_one_run_folder_are_refused(tmp_path):
    from EchoFMEngine.training.config import load_config
    from EchoFMEngine.training.pretrain import pretrain

    out = tmp_path / "run"
    cfg = load_config(None, [f"run.out={out}", "run.steps=1", "run.device=cpu", "run.tensorboard=false"])
    with RunLock(out, "pretraining"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            pretrain(cfg, progress=False)
    assert not (out / "log.csv").exists()


# ------------------------------------------------------------------ 6. unusable --out
@pytest.mark.parametrize("kind", ["file", "under_file", "proc"])
def test_unwritable_out_is_a_clear_usage_error(tmp_path, no_models, capsys, kind):
    files = make_cines(tmp_path / "in", 1)
    target = {"file": tmp_path / "f.txt", "under_file": tmp_path / "f.txt" / "sub", "proc": Path("/proc/x")}[kind]
    (tmp_path / "f.txt").write_text("x")
    assert batch.cli([str(files[0]), "--out", str(target), "--models", str(no_models), "--no-summary"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "Traceback" not in err


# ------------------------------------------------------------------ 7. stale checkpoint temporaries
def test_a_stale_checkpoint_temporary_is_removed_at_start(tmp_path):
    from EchoFMEngine.training import checkpointing

    d = tmp_path / "run" / "checkpoints"
    d.mkdir(parents=True)
    stale = d / ".step_00000004.pt.tmp.99999"
    stale.write_bytes(b"")
    keep = d / "step_00000002.pt"
    keep.write_bytes(b"x")
    lock = checkpointing.run_lock(tmp_path / "run", "pretraining")
    lock.release()
    assert not stale.exists() and keep.exists()


# ------------------------------------------------------------------ 8. NaN / truncated inputs
def test_nan_and_inf_in_a_float_npy_are_refused_naming_the_file(tmp_path):
    from EchoFMEngine.io import load_cine

    a = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    a[0, 0, 0] = np.nan
    a[1, 1, 1] = np.inf
    np.save(tmp_path / "some_nan.npy", a)
    np.save(tmp_path / "all_nan.npy", np.full((4, 8, 8), np.nan, np.float32))
    for name, count in (("some_nan.npy", "2 of 2048"), ("all_nan.npy", "256 of 256")):
        with pytest.raises(CineReadError, match=count) as e:
            load_cine(tmp_path / name)
        assert name in str(e.value)


def test_a_truncated_video_is_read_with_a_flag(tmp_path, no_models):
    from EchoFMEngine.io.video import read_video, write_video

    frames = np.random.default_rng(0).integers(0, 255, (30, 48, 48, 3), dtype=np.uint8)
    write_video(tmp_path / "full.avi", frames, 30.0)
    data = (tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    assert "truncated" not in read_video(tmp_path / "full.avi").source.extra
    cine = read_video(tmp_path / "cut.avi")
    assert cine.num_frames < 30 and "of 30 frames" in cine.source.extra["truncated"]
    analyze_paths([tmp_path / "cut.avi"], tmp_path / "out", models=no_models, progress=False, summary=False)
    assert "truncated" in rows(tmp_path / "out" / "results.csv")[0]["flags"]


@pytest.fixture(scope="module")
def dicom_file(tmp_path_factory):
    from EchoFMEngine.clinical.phantoms import make_study, write_dicom

    study = make_study("A4C", n_frames=12, size=(48, 48), seed=3)
    return write_dicom(study, tmp_path_factory.mktemp("dcm") / "a4c.dcm")


def test_nan_region_spacing_gives_unknown_spacing_and_valid_json(tmp_path, dicom_file, no_models):
    import pydicom

    from EchoFMEngine.io import load_cine

    ds = pydicom.dcmread(dicom_file)
    assert ds.SequenceOfUltrasoundRegions
    for r in ds.SequenceOfUltrasoundRegions:
        r.PhysicalDeltaY = float("nan")
    ds.save_as(tmp_path / "nan.dcm")
    assert load_cine(tmp_path / "nan.dcm").spacing_mm is None
    analyze_paths([tmp_path / "nan.dcm"], tmp_path / "out", models=no_models, progress=False, summary=False)
    text = (tmp_path / "out" / ids_of([tmp_path / "nan.dcm"])[0] / "result.json").read_text()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in result.json"))
    assert any((f["name"] if isinstance(f, dict) else f).startswith("unknown_spacing") for f in d["flags"])


def test_number_of_frames_lower_than_the_pixel_data_is_flagged(tmp_path, dicom_file):
    import warnings

    import pydicom

    from EchoFMEngine.io import load_cine

    ds = pydicom.dcmread(dicom_file)
    n = int(ds.NumberOfFrames)
    ds.NumberOfFrames = n - 4
    ds.save_as(tmp_path / "lying.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cine = load_cine(tmp_path / "lying.dcm")
    assert f"says {n - 4} but the pixel data holds {n} frames" in cine.source.extra["frame_count_mismatch"]
    assert "frame_count_mismatch" not in load_cine(dicom_file).source.extra


# ------------------------------------------------------------------ 9. exit codes
def test_exit_status_is_1_when_some_study_failed_and_0_when_all_done(tmp_path, no_models, capsys):
    files = make_cines(tmp_path / "in", 1)
    (tmp_path / "in" / "bad.npy").write_bytes(b"not numpy")
    assert batch.cli([str(files[0]), str(tmp_path / "in" / "bad.npy"), "--out", str(tmp_path / "o1"),
                      "--models", str(no_models), "--no-summary"]) == 1
    assert batch.cli([str(files[0]), "--out", str(tmp_path / "o2"), "--models", str(no_models), "--no-summary"]) == 0
    assert batch.cli([str(files[0]), "--out", str(tmp_path / "o2"), "--models", str(no_models), "--no-summary"]) == 0
    assert "1 already complete" in capsys.readouterr().out


def test_inputs_may_be_a_glob_or_a_csv_list(tmp_path, no_models):
    files = make_cines(tmp_path / "in", 3)
    (tmp_path / "list.csv").write_text("path,label\nin/s02.npy,x\nin/s00.npy,y\n")
    got, missing = batch.expand_inputs([str(tmp_path / "list.csv"), str(tmp_path / "in" / "s0[1].npy")])
    assert got == [files[2], files[0], files[1]] and not missing
    got, missing = batch.expand_inputs([str(tmp_path / "in" / "*.dcm")])
    assert not got and missing == [("*.dcm", "pattern matches no file")]


# ------------------------------------------------------------------ fault injection: SIGKILL anywhere
def test_sigkill_at_random_points_always_leaves_results_and_folders_consistent(tmp_path, no_models):
    """Kill ``analyze`` at random moments (during start-up, inside a study, between the folder rename
    and the row append) and resume each time: the CSV and the folders always agree, and the
    resumed run ends with the same results.csv as an uninterrupted one."""
    files = make_cines(tmp_path / "in", 8)
    ref = tmp_path / "ref"
    analyze_paths(files, ref, models=no_models, progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "EchoFMEngine", "analyze", str(tmp_path / "in"), "--out", str(out),
           "--models", str(no_models)]
    rng = random.Random(int(os.environ.get("ECHOFM_FAULT_SEED", "20")))
    for kill_after in (rng.randint(1, 3), rng.randint(4, 6)):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=REPO)
        seen = 0
        for line in proc.stdout:
            if line.startswith("PROGRESS"):
                seen += 1
                if seen >= kill_after:
                    break
        time.sleep(rng.uniform(0.0, 0.6))           # somewhere inside the next study
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ids, folders = consistent(out)
        assert len(set(folders) - set(ids)) <= 1
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already complete" in r.stdout
    assert (out / "results.csv").read_text() == (ref / "results.csv").read_text()
    consistent(out)
    assert not [p for p in out.iterdir() if ".tmp" in p.name] and not (out / LOCK_NAME).exists()
