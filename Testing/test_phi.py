"""No identifiers in anything an analysis writes (issue 15): a name burned into the pixels outside the
scan sector never reaches a PNG (OCR-free: every written PNG is pixel-identical to the one written
from the same study without the text), DICOM tags and the file name never reach any output file."""
import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from EchoFMEngine.clinical import geometry
from EchoFMEngine.clinical.phantoms import make_study, write_dicom

NAME = "Surname_Given_PID123"


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    study = make_study("A4C", n_frames=32, size=(128, 160), fps=30.0, heart_rate_bpm=80, ef=55, seed=5)
    frames = study.cine.frames.copy()
    sector = study.sector
    for f in frames:            # the name in white in the lower corners, outside the fan
        cv2.putText(f, "SURNAME", (2, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1)
        cv2.putText(f, "PID123", (118, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1)
    burned = frames.any(-1) & ~study.cine.frames.any(-1)
    assert burned.any() and not (burned.any(0) & sector).any(), "the test text must lie outside the sector"
    root = tmp_path_factory.mktemp("phi")
    with_name = dataclasses.replace(study, cine=dataclasses.replace(study.cine, frames=frames))
    (root / "named").mkdir()
    (root / "clean").mkdir()
    path = write_dicom(with_name, root / "named" / f"{NAME}.dcm")
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID, ds.InstitutionName = "Surname^Given", "PID123", "St Elsewhere Hospital"
    ds.save_as(path)
    write_dicom(study, root / "clean" / "clean.dcm")
    return study, root


class Proc:
    def __init__(self, out, err):
        self.stdout, self.stderr = out, err


def run(inputs, out, capfd=None, **kw):
    from EchoFMEngine.analysis import analyze_paths

    report = analyze_paths(inputs, out, models=out.parent / "no_models", progress=capfd is not None, **kw)
    assert report["done"] and not report["failed"], report
    return Proc(*capfd.readouterr()) if capfd is not None else None


def test_blank_outside_sector_zeroes_every_pixel_outside(studies):
    study, _ = studies
    out = geometry.blank_outside_sector(study.cine.frames)
    sector = geometry.find_sector(study.cine.frames)
    assert not out[:, ~sector].any() and np.array_equal(out[:, sector], study.cine.frames[:, sector])
    assert not geometry.blank_outside_sector(np.zeros((2, 20, 20, 3), np.uint8) + 50).any()   # no sector: all


def test_no_name_tag_or_burned_text_in_any_output(studies, capfd):
    study, root = studies
    proc = run([root / "named"], root / "out_named", capfd)
    run([root / "clean"], root / "out_clean")
    out = root / "out_named"
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in written) and any(p.name == "result.json" for p in written)
    for word in ("Surname", "SURNAME", "Given", "PID123", "Elsewhere", NAME):
        assert word not in proc.stdout + proc.stderr, word
        for p in written:
            assert word.encode() not in p.read_bytes(), f"{word} in {p.relative_to(out)}"
        assert word not in " ".join(p.name for p in written)
    # every PNG equals the one written without the burned-in name: nothing outside the sector is drawn
    named = sorted(p for p in written if p.suffix == ".png")
    clean = sorted((root / "out_clean").rglob("*.png"))
    assert [p.name for p in named] == [p.name for p in clean]
    for a, b in zip(named, clean):
        ia, ib = cv2.imread(str(a)), cv2.imread(str(b))
        assert ia.shape == ib.shape
        rows = np.flatnonzero((ia != ib).any(-1).any(1))
        # only the title differs (the derived study id hashes the file's content); images, text, plots are equal
        assert rows.size == 0 or rows.max() < 40, f"{a.name} shows pixels from outside the sector (rows {rows[:5]})"
    assert not (out / "paths.csv").exists()


def test_keep_paths_writes_the_one_mapping_file(studies):
    _, root = studies
    run([root / "named"], root / "out_keep", keep_paths=True, summary=False)
    mapping = (root / "out_keep" / "paths.csv").read_text()
    assert NAME in mapping
    others = [p for p in (root / "out_keep").rglob("*") if p.is_file() and p.name != "paths.csv"]
    assert all(b"PID123" not in p.read_bytes() for p in others)
