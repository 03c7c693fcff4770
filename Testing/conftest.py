"""Shared fixtures: the real test files in ../shared/data (skipped when absent) and small helpers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # EchoFMSlicer is a source folder (as Slicer loads it), not an installed package
    sys.path.insert(0, str(REPO))
SHARED_DATA = Path(os.environ.get("ECHOFM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real echo/ECG files; tests using it skip when a clone has no ../shared/data."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set ECHOFM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one thread (and far faster when other jobs share the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
