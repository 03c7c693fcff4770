"""EDV, ESV, EF and LA volume from the current (possibly corrected) ED/ES segmentations.

The numbers come from :func:`EchoFMEngine.clinical.measure.cardiac_measurements` on the label maps read
back from the segmentation nodes, so the panel and the engine never disagree. Results go into a
table node; the LV volume over time into a plot.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import vtk

from .ecg_nodes import table_from_columns
from .scene import add_node, all_or_nothing
from .segmentation_nodes import mask_provenance, segmentation_to_labels
from EchoFMEngine.clinical.measure import cardiac_measurements


def measure_from_segmentations(ed_seg, es_seg, reference, spacing_mm, method: str = "discs") -> dict:
    """Volumes and EF of one ED/ES pair of segmentation nodes (LV_endo = cavity, LA), by the engine.

    Keys: ``unit``, ``area_unit``, ``method``, ``edv``, ``esv``, ``ef_percent``, ``la_volume``,
    ``ed_area``, ``es_area``, ``ed_frame``, ``es_frame``, ``masks`` ({"ED": provenance, "ES": ...}),
    ``notes``. Volumes are ml with ``spacing_mm`` (row, col), px^3 without; None when not measurable."""
    ed_lab = segmentation_to_labels(ed_seg, reference)
    es_lab = segmentation_to_labels(es_seg, reference)
    if ed_lab.shape != es_lab.shape:
        raise ValueError(f"ED mask {ed_lab.shape} and ES mask {es_lab.shape} differ in size")
    m = cardiac_measurements(np.stack([ed_lab, es_lab]), spacing_mm, [0], [1], method=method)
    ed_info, es_info = mask_provenance(ed_seg, reference), mask_provenance(es_seg, reference)
    ed, es = ed_info["frame"], es_info["frame"]
    starts = [("frame 0:", f"ED frame {ed}:"), ("frame 1:", f"ES frame {es}:")]
    inside = [("ED frame(s) [0]", f"ED frame(s) [{ed}]"), ("ES frame(s) [1]", f"ES frame(s) [{es}]"),
              ("ED 0 / ES 1", f"ED {ed} / ES {es}")]
    notes = []
    for note in m["notes"]:  # the engine numbers the two maps 0 and 1: give the cine's frames
        for old, new in starts:
            if note.startswith(old):
                note = new + note[len(old):]
        for old, new in inside:
            note = note.replace(old, new, 1)
        notes.append(note)
    return {"unit": m["unit"], "area_unit": m["area_unit"], "method": m["method"],
            "edv": m["lv_volume"][0], "esv": m["lv_volume"][1], "ef_percent": m["ef_percent"],
            "la_volume": m["la_volume"], "ed_area": m["lv_area"][0], "es_area": m["lv_area"][1],
            "ed_frame": ed_info["frame"], "es_frame": es_info["frame"],
            "masks": {"ED": ed_info, "ES": es_info}, "notes": notes}


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def measurements_table(scene, measurements: dict, name: str):
    """Table node with one row per measurement: ``measurement``, ``value``, ``unit``, ``note``."""
    unit = measurements.get("unit", "")
    masks = measurements.get("masks") or {}
    rows = [("EDV", measurements.get("edv"), unit, masks.get("ED", {}).get("source", "")),
            ("ESV", measurements.get("esv"), unit, masks.get("ES", {}).get("source", "")),
            ("EF", measurements.get("ef_percent"), "%", ""),
            ("LA volume", measurements.get("la_volume"), unit, "area-length, largest of the measured frames"),
            ("ED frame", measurements.get("ed_frame"), "", ""),
            ("ES frame", measurements.get("es_frame"), "", "")]
    if measurements.get("ed_frame") is None and measurements.get("ed_frames"):
        rows[4] = ("ED frames", None, "", " ".join(map(str, measurements["ed_frames"])))
        rows[5] = ("ES frames", None, "", " ".join(map(str, measurements.get("es_frames") or [])))
    with all_or_nothing(scene):
        node = add_node(scene, "vtkMRMLTableNode", name)
        table = vtk.vtkTable()
        for col, values in (("measurement", [r[0] for r in rows]), ("unit", [r[2] for r in rows]),
                            ("note", [r[3] if r[3] else "" for r in rows])):
            arr = vtk.vtkStringArray()
            arr.SetName(col)
            for v in values:
                arr.InsertNextValue(str(v))
            table.AddColumn(arr)
        val = vtk.vtkDoubleArray()
        val.SetName("value")
        for r in rows:
            val.InsertNextValue(_num(r[1]))
        table.InsertColumn(val, 1)
        node.SetAndObserveTable(table)
        node.SetAttribute("EchoFM.role", "measurements")
    return node


def table_rows(node) -> dict:
    """``{measurement: (value or None, unit)}`` read back from a measurements table node."""
    t = node.GetTable()
    names, values, units = (t.GetColumnByName(c) for c in ("measurement", "value", "unit"))
    out = {}
    for i in range(t.GetNumberOfRows()):
        v = values.GetValue(i)
        out[names.GetValue(i)] = (None if math.isnan(v) else v, units.GetValue(i))
    return out


def volume_curve_plot(scene, times: Sequence[float], volumes: Sequence[Optional[float]],
                      name: str = "LV volume", unit: str = "ml"):
    """Plot chart of the LV volume over time (frames without a volume are left out)."""
    t = np.asarray(times, dtype=np.float64)
    if len(volumes) != t.size:
        raise ValueError(f"{t.size} times but {len(volumes)} volumes")
    keep = [i for i, v in enumerate(volumes) if v is not None]
    if not keep:
        raise ValueError("no frame has an LV volume to plot")
    with all_or_nothing(scene):
        table = table_from_columns(scene, f"{name} table",
                                   {"time_s": t[keep], "volume": np.asarray([volumes[i] for i in keep], float),
                                    "frame": np.asarray(keep, dtype=np.int32)},
                                   units={"time_s": "s", "volume": unit})
        series = add_node(scene, "vtkMRMLPlotSeriesNode", name)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("time_s")
        series.SetYColumnName("volume")
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetColor(0.6, 0.2, 0.05)
        chart = add_node(scene, "vtkMRMLPlotChartNode", f"{name} chart")
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle(name)
        chart.SetXAxisTitle("time (s)")
        chart.SetYAxisTitle(f"volume ({unit})")
    return chart
