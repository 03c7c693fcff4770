"""EchoFMSlicerLib.runner (background processes) and .dependencies (missing packages), without Slicer.

The runner is tested with REAL child processes (small Python scripts written here): progress
parsing, non-blocking polls, cancel of a whole process tree, failures and unknown programs.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # EchoFMSlicer/ is a folder of the repository (in Slicer: EchoFMSlicerLib)
    sys.path.insert(0, str(REPO))

from EchoFMEngine.atomic import pid_alive as alive  # noqa: E402  (a zombie waiting for a reaper counts as gone)
from EchoFMSlicer.EchoFMSlicerLib import dependencies as deps  # noqa: E402
from EchoFMSlicer.EchoFMSlicerLib.runner import (BackgroundProcess, ProcessStartError,  # noqa: E402
                                                 engine_environment, parse_progress, python_command)

posix_only = pytest.mark.skipif(os.name != "posix", reason="process-group checks use POSIX signals")


def script(tmp_path: Path, body: str, name: str = "child.py") -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---------------------------------------------------------------------- progress parsing
@pytest.mark.parametrize("line, done, total, text", [
    ("PROGRESS 3/8 study_a4c", 3, 8, "study_a4c"),
    ("PROGRESS 0/2", 0, 2, ""),
    ("pretrain:  45%|####5     | 45/100 [00:01<00:02, 30.00it/s]", 45, 100, "pretrain"),
    ("100%|##########| 10/10 [00:02<00:00,  4.99it/s, loss=0.12]", 10, 10, ""),
    ("  seg step 30/120 loss 0.4312 lr 1.2e-03", 30, 120, "seg step 30/120 loss 0.4312 lr 1.2e-03"),
    ("Epoch 2/5 done", 2, 5, "Epoch 2/5 done"),
    ("7/9 frames", 7, 9, "frames"),
])
def test_progress_lines_are_parsed(line, done, total, text):
    e = parse_progress(line)
    assert e is not None and e.kind == "progress"
    assert (e.done, e.total, e.text) == (done, total, text)
    assert e.fraction == pytest.approx(done / total)


@pytest.mark.parametrize("line", ["loading model", "2024/01/05 12:00 started", "ratio 5/0", "PROGRESS 9/3 x",
                                  "EF 55.0 % (truth 54.1 %)", "imported segment: /tmp/m/segment-abc.safetensors"])
def test_other_lines_are_not_progress(line):
    assert parse_progress(line) is None


# ---------------------------------------------------------------------- real processes
def test_progress_and_output_of_a_real_process(tmp_path):
    cmd = script(tmp_path, """
        import sys, time
        for i in range(1, 4):
            print(f"PROGRESS {i}/3 study_{i}", flush=True)
            time.sleep(0.02)
        for k in (5, 10):   # a tqdm bar redrawn with carriage returns on stderr
            sys.stderr.write(f"\\rtrain: {10 * k}%|#####     | {k}/10 [00:01<00:01]"); sys.stderr.flush()
        sys.stderr.write("\\n")
        print("wrote out/result.json")
    """)
    p = BackgroundProcess(cmd, cwd=tmp_path).start()
    assert p.wait(timeout=20) == 0
    events = p.poll()
    assert events[-1].kind == "finished" and events[-1].text == "finished"
    prog = [e for e in events if e.kind == "progress"]
    analysis = [(e.done, e.total, e.text) for e in prog if e.text.startswith("study")]
    assert analysis == [(1, 3, "study_1"), (2, 3, "study_2"), (3, 3, "study_3")]
    assert [(e.done, e.text) for e in prog if e.text == "train"] == [(5, "train"), (10, "train")]
    assert [e.text for e in events if e.kind == "stdout"] == ["wrote out/result.json"]
    assert p.finished and p.returncode == 0 and p.error_message == "" and not p.cancelled
    assert p.poll() == []                     # everything was handed out once


def test_poll_never_blocks_while_the_process_works(tmp_path):
    cmd = script(tmp_path, """
        import time
        print("PROGRESS 1/2 first", flush=True)
        time.sleep(1.5)
        print("PROGRESS 2/2 second", flush=True)
    """)
    p = BackgroundProcess(cmd).start()
    assert wait_for(lambda: p.progress is not None or any(e.kind == "progress" for e in p.poll()))
    t = time.perf_counter()
    for _ in range(20):
        p.poll()
    assert time.perf_counter() - t < 0.2       # 20 polls while the child sleeps
    assert not p.finished
    assert p.wait(timeout=20) == 0
    assert p.progress.done == 2 and p.progress.fraction == 1.0


@posix_only
def test_cancel_kills_the_whole_process_tree(tmp_path):
    cmd = script(tmp_path, """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)      # a child that ignores a polite stop
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"pids {grandchild.pid}", flush=True)
        print("PROGRESS 1/100 working", flush=True)
        time.sleep(60)
    """)
    p = BackgroundProcess(cmd).start()
    seen = []
    assert wait_for(lambda: seen.extend(p.poll()) or any(e.text.startswith("pids") for e in seen))
    grandchild = int(next(e.text for e in seen if e.text.startswith("pids")).split()[1])
    child = p.pid
    assert alive(child) and alive(grandchild)
    t = time.perf_counter()
    p.cancel(grace_s=0.5)
    assert wait_for(lambda: p.finished, timeout=10)
    assert time.perf_counter() - t < 8
    assert not alive(child)
    assert wait_for(lambda: not alive(grandchild), timeout=5), "the grandchild survived cancel()"
    assert p.cancelled and p.returncode == -signal.SIGKILL
    assert p.error_message == "cancelled by the user"
    assert p.poll()[-1].text == "cancelled"


@posix_only
def test_a_grandchild_that_keeps_the_pipes_open_does_not_hang_the_job(tmp_path):
    """A process that left the group (own session) and inherited stdout must not keep the job running."""
    cmd = script(tmp_path, """
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
        print(f"pids {p.pid}", flush=True)
    """)
    p = BackgroundProcess(cmd).start()
    t = time.perf_counter()
    rc = p.wait(timeout=15)
    took = time.perf_counter() - t
    events = p.poll()
    stray = [int(e.text.split()[1]) for e in events if e.text.startswith("pids")]
    for pid in stray:                       # our own sleeper: end it before asserting anything
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert rc == 0 and took < 10
    assert len(stray) == 1 and events[-1].text == "finished"


def test_failure_surfaces_the_error_message(tmp_path):
    cmd = script(tmp_path, """
        import sys
        print("PROGRESS 0/1 reading", flush=True)
        print("Traceback (most recent call last):", file=sys.stderr)
        print("error: /data/clip.avi: not a readable video (no frames)", file=sys.stderr)
        sys.exit(3)
    """)
    p = BackgroundProcess(cmd, name="Analysis").start()
    assert p.wait(timeout=20) == 3
    assert "Analysis failed with exit code 3" in p.error_message
    assert "not a readable video (no frames)" in p.error_message
    last = p.poll()[-1]
    assert last.kind == "finished" and "exit code 3" in last.text


def test_a_program_that_does_not_exist_gives_a_clear_error(tmp_path):
    p = BackgroundProcess([str(tmp_path / "no-such-program"), "--help"])
    with pytest.raises(ProcessStartError, match="no such program"):
        p.start()
    assert p.finished and "no-such-program" in p.error_message and p.returncode is None


def test_a_missing_working_folder_is_named(tmp_path):
    p = BackgroundProcess([sys.executable, "-c", "pass"], cwd=tmp_path / "gone")
    with pytest.raises(ProcessStartError, match="working folder .*gone does not exist"):
        p.start()


def test_commands_are_argument_lists():
    with pytest.raises(ValueError, match="list of arguments"):
        BackgroundProcess("python -m EchoFMEngine analyze x")


def test_engine_environment_lets_the_child_import_from_extra_paths(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "echofm_probe_mod.py").write_text("VALUE = 42\n")
    env = engine_environment([str(lib)], env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(lib), "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1"
    p = BackgroundProcess([sys.executable, "-c", "import echofm_probe_mod as m; print(m.VALUE)"], env=env).start()
    assert p.wait(timeout=20) == 0
    assert [e.text for e in p.poll() if e.kind == "stdout"] == ["42"]


def test_python_command_inside_and_outside_slicer(tmp_path, monkeypatch):
    assert python_command(in_slicer=False) == [sys.executable]
    app = tmp_path / "bin" / "SlicerApp-real"
    app.parent.mkdir()
    app.write_text("")
    launcher = app.parent / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ProcessStartError, match="PythonSlicer"):
        python_command(str(app), in_slicer=True)
    launcher.write_text("")
    assert python_command(str(app), in_slicer=True) == [str(launcher.resolve())]


# ---------------------------------------------------------------------- dependencies
def test_engine_requirements_come_from_pyproject():
    import tomllib

    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert deps.find_pyproject() == REPO / "pyproject.toml"
    assert deps.engine_requirements() == expected
    assert deps.missing_requirements() == []          # this test environment has the engine installed


def test_missing_requirements_and_what_is_never_replaced():
    reqs = ["numpy>=999", "SimpleITK>=999", "vtk>=999", "pyyaml>=1", "echofm-not-a-package-xyz>=1.0",
            "torch>=999", "scipy"]
    # numpy/SimpleITK/vtk import here: never listed, even with an impossible version
    assert deps.missing_requirements(reqs) == ["echofm-not-a-package-xyz>=1.0", "torch>=999"]


def test_install_plan_sends_torch_to_pytorchutils():
    plan = deps.install_plan(["torch>=2.1", "torchvision>=0.16", "timm>=1.0.9"], use_pytorch_utils=True)
    assert plan.torch == ["torch>=2.1", "torchvision>=0.16"] and plan.pip == ["timm>=1.0.9"]
    assert plan.torch_version_requirement == ">=2.1"
    assert "PyTorchUtils" in plan.describe() and "timm>=1.0.9" in plan.describe()
    assert deps.pip_command(plan, ["PythonSlicer"]) == ["PythonSlicer", "-m", "pip", "install", "timm>=1.0.9"]
    plain = deps.install_plan(["torch>=2.1", "timm"], use_pytorch_utils=False)
    assert deps.pip_command(plain, ["py"])[-2:] == ["timm", "torch>=2.1"]
    assert deps.install_plan([], use_pytorch_utils=False).empty
    with pytest.raises(ValueError, match="ships with Slicer"):
        deps.install_plan(["numpy>=2"], use_pytorch_utils=False)


def test_requirement_parsing():
    r = deps.Requirement.parse("opencv-python-headless >= 4.8 ; python_version > '3.8'")
    assert (r.name, r.specifier, r.import_name) == ("opencv-python-headless", ">=4.8", "cv2")
    assert deps.Requirement.parse("PyYAML>=6").import_name == "yaml"
    assert deps.Requirement.parse("pylibjpeg-libjpeg>=2.1").import_name == "libjpeg"
    with pytest.raises(ValueError, match="not a requirement"):
        deps.Requirement.parse(">=1.0")
