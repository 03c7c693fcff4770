"""`python -m EchoFMEngine phase`: one PNG and one JSON per cine, names that do not copy the file
name, a bad file reported and skipped; `bench phase` runs."""
from __future__ import annotations

import json

import numpy as np

from EchoFMEngine.analysis.phase_command import cli
from EchoFMEngine.clinical.phantoms import make_study


def test_phase_command_writes_strip_and_json_and_skips_bad_files(tmp_path):
    st = make_study("A4C", n_frames=90, size=(96, 96), fps=30, heart_rate_bpm=72, ef=55, seed=2)
    good = tmp_path / "Surname_Given_PID123.npz"
    np.savez(good, frames=st.cine.frames, fps=st.cine.fps)
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"not a video")
    out = tmp_path / "out"
    assert cli([str(good), str(bad), "--out", str(out), "--no-ecg"]) == 1  # one failed
    pngs, jsons = sorted(out.glob("*.png")), sorted(out.glob("*.json"))
    assert len(pngs) == 1 and len(jsons) == 1
    assert not any("Surname" in p.name for p in out.iterdir())
    result = json.loads(jsons[0].read_text())
    assert result["method"] == "image" and len(result["ed_frames"]) >= 2
    assert len(result["ed_confidence"]) == len(result["ed_frames"])
    assert "Surname" not in jsons[0].read_text()
