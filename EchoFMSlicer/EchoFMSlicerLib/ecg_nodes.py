"""The ECG as a table node (time, ecg, triggerTimes), its plot, and a marker at the current frame.

The table is SlicerHeart's (its ultrasound readers write columns ``time``, ``ecg`` and
``triggerTimes``, and reference the table from the browser, the sequence and the proxy volume
under the role ``SlicerHeart.ECG``); ``triggerTimes`` holds the R-peak times, NaN past the last
one (a table's columns have one length). Values are in mV (the engine converts DICOM waveforms).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from EchoFMEngine.cine import Ecg

from .scene import add_node

ECG_ROLE = "SlicerHeart.ECG"
CHART_ROLE = "EchoFM.ecgChart"
MARKER_ROLE = "EchoFM.frameMarker"
PEAKS_ROLE = "EchoFM.rPeaks"
TIME, VALUE, TRIGGERS = "time", "ecg", "triggerTimes"      # SlicerHeart's column names


def table_from_columns(scene, name: str, columns: dict, units: Optional[dict] = None):
    """A table node from ``{column name: 1D numbers}`` (int arrays stay integer, others double)."""
    table = vtk.vtkTable()
    for col, values in columns.items():
        arr = np.asarray(values)
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
            data = numpy_support.numpy_to_vtk(arr.astype(np.int32), deep=True, array_type=vtk.VTK_INT)
        else:
            data = numpy_support.numpy_to_vtk(arr.astype(np.float64), deep=True, array_type=vtk.VTK_DOUBLE)
        data.SetName(col)
        table.AddColumn(data)
    node = add_node(scene, "vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    for col, unit in (units or {}).items():
        node.SetColumnUnitLabel(col, unit)
    return node


def table_column(table_node, name: str) -> np.ndarray:
    """One column of a table node as a numpy array (KeyError naming the column when absent)."""
    arr = table_node.GetTable().GetColumnByName(name)
    if arr is None:
        raise KeyError(f"table {table_node.GetName()!r} has no column {name!r}")
    return numpy_support.vtk_to_numpy(arr).copy()


def ecg_to_table(scene, ecg: Ecg, r_peak_times_s: Sequence[float], name: str):
    """Table node ``time`` (s, cine clock), ``ecg`` (mV), ``triggerTimes`` (s: the R peaks, NaN-padded)."""
    t = ecg.times_s
    peaks = np.sort(np.asarray(list(r_peak_times_s), dtype=np.float64))
    if peaks.size > t.size:
        raise ValueError(f"{peaks.size} R peaks for an ECG of {t.size} samples")
    triggers = np.full(t.size, np.nan)
    triggers[:peaks.size] = peaks
    node = table_from_columns(scene, name, {TIME: t, VALUE: ecg.signal, TRIGGERS: triggers},
                              units={TIME: "s", VALUE: "mV", TRIGGERS: "s"})
    node.SetAttribute("EchoFM.ecgFs", repr(ecg.fs))
    node.SetAttribute("EchoFM.ecgLead", str(ecg.lead))
    return node


def table_to_ecg(table_node) -> Ecg:
    """The :class:`Ecg` held by an ECG table node (inverse of :func:`ecg_to_table`)."""
    t = table_column(table_node, TIME)
    if t.size < 2:
        raise ValueError(f"ECG table {table_node.GetName()!r} has fewer than 2 samples")
    fs_attr = table_node.GetAttribute("EchoFM.ecgFs")
    fs = float(fs_attr) if fs_attr else 1.0 / float(np.median(np.diff(t)))
    return Ecg(table_column(table_node, VALUE), fs=fs, lead=table_node.GetAttribute("EchoFM.ecgLead") or "unknown",
               t0_s=float(t[0]))


def r_peak_times(table_node) -> np.ndarray:
    """R-peak times (s): the ``triggerTimes`` column without its NaN padding."""
    triggers = table_column(table_node, TRIGGERS)
    return triggers[np.isfinite(triggers)]


def _series(scene, name: str, table, x: str, y: str, color, line: bool, marker: bool):
    s = add_node(scene, "vtkMRMLPlotSeriesNode", name)
    s.SetAndObserveTableNodeID(table.GetID())
    s.SetXColumnName(x)
    s.SetYColumnName(y)
    s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    s.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid if line else slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
    s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if marker
                     else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    s.SetColor(*color)
    return s


def ecg_plot(scene, table, name: Optional[str] = None):
    """Plot chart of the ECG with its R peaks and a vertical marker at the current frame."""
    base = name or table.GetName()
    t, v = table_column(table, TIME), table_column(table, VALUE)
    idx = np.unique(np.abs(t[None, :] - r_peak_times(table)[:, None]).argmin(axis=1)) if t.size else np.array([], int)
    peaks = table_from_columns(scene, f"{base} R peaks", {TIME: t[idx], VALUE: v[idx]},
                               units={TIME: "s", VALUE: "mV"})
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    marker = table_from_columns(scene, f"{base} frame marker", {TIME: [0.0, 0.0], VALUE: [lo, hi]},
                                units={TIME: "s", VALUE: "mV"})
    chart = add_node(scene, "vtkMRMLPlotChartNode", f"{base} chart")
    for s in (_series(scene, f"{base} ECG", table, TIME, VALUE, (0.1, 0.6, 0.2), True, False),
              _series(scene, f"{base} R peaks", peaks, TIME, VALUE, (0.9, 0.1, 0.1), False, True),
              _series(scene, f"{base} current frame", marker, TIME, VALUE, (1.0, 0.8, 0.0), True, False)):
        chart.AddAndObservePlotSeriesNodeID(s.GetID())
    chart.SetTitle("ECG")
    chart.SetXAxisTitle("time (s)")
    chart.SetYAxisTitle("ECG (mV)")
    chart.SetNodeReferenceID(MARKER_ROLE, marker.GetID())
    chart.SetNodeReferenceID(PEAKS_ROLE, peaks.GetID())
    return chart


def frame_marker_time(browser, item: Optional[int] = None) -> float:
    """Time (s) of the browser's current item (or of ``item``), from its index value."""
    seq = browser.GetMasterSequenceNode()
    if seq is None or seq.GetNumberOfDataNodes() == 0:
        raise ValueError(f"browser {browser.GetName()!r} has no sequence items")
    i = browser.GetSelectedItemNumber() if item is None else int(item)
    i = min(max(i, 0), seq.GetNumberOfDataNodes() - 1)
    unit = (seq.GetIndexUnit() or "").strip().lower()
    try:
        value = float(seq.GetNthIndexValue(i))
    except ValueError:
        value = float(i)
        unit = "frame"
    if unit == "ms":
        return value / 1000.0
    if unit in ("s", "sec", ""):
        return value
    fps = browser.GetPlaybackRateFps() or 1.0
    return i / fps


def update_frame_marker(chart, browser) -> float:
    """Move the chart's current-frame marker to the browser's current item; returns its time (s)."""
    t = frame_marker_time(browser)
    marker = chart.GetNodeReference(MARKER_ROLE)
    if marker is None:
        raise ValueError(f"chart {chart.GetName()!r} has no frame marker (make it with ecg_plot)")
    col = marker.GetTable().GetColumnByName(TIME)
    col.SetValue(0, t)
    col.SetValue(1, t)
    col.Modified()
    marker.GetTable().Modified()
    marker.Modified()
    return t
