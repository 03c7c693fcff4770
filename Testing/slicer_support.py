"""Shared helpers for the Slicer-library tests (run against PyPI slicer-core, no Slicer application)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # EchoFMSlicer/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))


def phantom(n_frames: int = 40, size=(64, 80), spacing_mm=(0.9, 1.4), seed: int = 3, **kw):
    """A small phantom study with known masks; anisotropic spacing and a non-square frame, so a
    swapped row/column axis or a flip cannot pass unnoticed."""
    from EchoFMEngine.clinical.phantoms import make_study

    return make_study(n_frames=n_frames, size=size, spacing_mm=spacing_mm, seed=seed, **kw)


def write_phantom_dicom(study, path, photometric: str = "RGB") -> Path:
    from EchoFMEngine.clinical.phantoms import write_dicom

    return write_dicom(study, path, photometric=photometric)


def node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def segment_from_slicerio(seg: dict, name: str) -> np.ndarray:
    """bool [H, W] of segment ``name`` from a slicerio segmentation dict (voxels [layer,] I, J, K)."""
    import slicerio

    s = slicerio.segment_from_name(seg, name)
    vox = seg["voxels"]
    layer = vox[s["layer"]] if vox.ndim == 4 else vox
    return (layer[..., 0] == s["labelValue"]).T  # (I=col, J=row) -> [row, col]


def grow_into_myocardium(labels_2d: np.ndarray, rows: int = 2) -> np.ndarray:
    """A brush stroke: myocardium pixels of the ``rows`` rows just above the LV cavity (toward the apex)."""
    cavity = labels_2d == 1
    top = int(np.flatnonzero(cavity.any(axis=1))[0])
    stroke = np.zeros_like(cavity)
    stroke[max(top - rows, 0):top] = labels_2d[max(top - rows, 0):top] == 2
    if not stroke.any():
        raise AssertionError("phantom has no myocardium above the cavity to paint")
    return stroke


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    """A 24-frame A4C phantom with known masks, written as a DICOM with an ECG waveform."""
    study = phantom(n_frames=24, size=(72, 80), view="A4C", fps=30.0, heart_rate_bpm=75, ef=55, seed=11)
    return study, write_phantom_dicom(study, tmp_path_factory.mktemp("phantom") / "a4c.dcm")


@pytest.fixture
def logic(tmp_path):
    """The panel's logic on a fresh slicer-core scene."""
    from EchoFMSlicer.EchoFMSlicerLib.logic import EchoFMLogic
    from EchoFMSlicer.EchoFMSlicerLib.scene import new_scene

    scene, logics = new_scene()
    return EchoFMLogic(scene, logics, work_folder=tmp_path / "work")
