"""Qt-free library of the EchoFM Slicer module: cines, ECG, masks, measurements and exports as MRML nodes.

Imports ``slicer`` MRML classes, vtk, numpy and EchoFMEngine, never qt/ctk or the Slicer
application, and takes the scene (and logics) as arguments, so it runs inside Slicer and
headless with PyPI ``slicer-core`` (``new_scene()``). Names load on first use, so
``EchoFMSlicerLib.runner`` / ``.dependencies`` import without MRML. See docs/slicer-console.md.
"""
from __future__ import annotations

import importlib

_API = {
    "scene": ["Logics", "register_modules", "new_scene", "all_or_nothing"],
    "cine_nodes": ["CineNodes", "cine_to_nodes", "load_cine_file", "nodes_to_cine", "cine_nodes_from_browser",
                   "check_analysable", "go_to_frame", "save_cine_sequence"],
    "ecg_nodes": ["ECG_ROLE", "ecg_to_table", "ecg_plot", "frame_marker_time", "update_frame_marker",
                  "r_peak_times", "table_to_ecg"],
    "segmentation_nodes": ["SEGMENTS", "labels_to_segmentation", "masks_to_segmentation_sequence",
                           "ed_es_segmentations", "segmentation_to_labels", "segment_mask", "set_segment_mask",
                           "ai_copy", "mask_provenance", "sequence_frames", "configure_segment_editor",
                           "save_segmentation", "save_segmentation_sequence", "read_segmentation_sequence_mrb"],
    "measurements": ["measure_from_segmentations", "measurements_table", "table_rows", "volume_curve_plot"],
    "export": ["export_training_folder", "write_report", "study_key"],
    "results": ["apply_analysis_result", "read_analysis_result"],
    "logic": ["EchoFMLogic"],
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
