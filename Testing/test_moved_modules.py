"""Modules that moved keep their old import path: same module object, with a DeprecationWarning."""
import importlib
import sys

import pytest

import EchoFMEngine


@pytest.mark.parametrize("old,new", sorted(EchoFMEngine.MOVED.items()))
def test_old_path_is_the_moved_module(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_top_level_exports_resolve():
    for name in ("load_cine", "analyze", "detect_ed_es", "lv_volume_ml", "propagate_masks", "build_dataset"):
        assert callable(getattr(EchoFMEngine, name)), name
