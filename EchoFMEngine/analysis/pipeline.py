"""One call from a cine loop to everything the models and the measurements can say about it.

:func:`analyze` reads the cine, checks it, finds ED/ES, runs whichever fine-tuned models the
models folder holds (view, segmentation, AS, EF regression), measures volumes and EF from the
masks (the model's, or the user's), and returns a :class:`StudyResult`. A result field is
``None`` when it could not be computed, and ``needs`` says which weights would fill it; no field
is ever guessed.

Every result also carries ``flags`` (``{"name", "reason"}``: plausibility, view, input and model
checks, :mod:`.plausibility`), ``measurements["reliable"]`` (a number behind a failed check is
marked unreliable) and ``provenance`` (which model file, trained on what, made each output;
how ED/ES and the masks were found, :mod:`.provenance`). No file name or path is kept: the
result's ``input`` is the derived study id.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from ..cine import Cine
from ..models.registry import ModelStore
from . import inference, plausibility as plaus
from .plausibility import flag
from ..tasks import LABEL_TEXT, LABELS, REGRESSION, SEGMENTATION, TASKS, get_task, tasks_of
from ..runtime.distributed import resolve_device
from . import embedding_signal as embedding   # a module: it imports .inference back
from ..clinical.geometry import choose_bmode_panel, colour_doppler_frames, find_panels, find_sector
from ..clinical.measure import cardiac_measurements
from ..clinical.phase import detect_ed_es
from ..io import load_cine
from ..models.provenance import is_phantom_cine, model_provenance, models_provenance
from ..models.task_checkpoint import load_task_model
from .inference import share_encoders

LOW_CONFIDENCE = 0.6          # top view probability below this -> flag "low_view_confidence"
APICAL_VIEWS = ("A2C", "A3C", "A4C", "A5C")   # views the method of discs (and LV/LA masks) assumes
VIEWS = APICAL_VIEWS + ("PLAX", "PSAX", "other")
SEGMENT_LABELS = {str(lab.value): lab.name for lab in LABELS}
CINE_TASKS = tasks_of(analysed=True)          # what the analysis of one cine runs (view, segment, as, ef)
CLIP_TASKS = tuple(t for t in CINE_TASKS if get_task(t).kind != SEGMENTATION)   # scored per cycle window


@dataclass
class StudyResult:
    """What :func:`analyze` found for one cine; ``to_dict()`` is what ``result.json`` holds."""

    input: str
    cine: dict
    view: Optional[dict] = None
    phase: Optional[dict] = None
    segmentation: Optional[dict] = None
    measurements: Optional[dict] = None
    scores: dict = field(default_factory=lambda: {t.score_key or t.name: None for t in TASKS
                                                  if t.kind != SEGMENTATION and t.analysis != "view"})
    flags: list = field(default_factory=list)
    needs: dict = field(default_factory=dict)
    timing_s: dict = field(default_factory=dict)
    masks: Optional[np.ndarray] = field(default=None, repr=False)   # [T, H, W] uint8, original pixels
    study_id: Optional[str] = None
    provenance: dict = field(default_factory=dict)
    phase_view: Optional[tuple] = field(default=None, repr=False)  # (analysed cine, Phase) for the phase strip

    def to_dict(self) -> dict:
        d = asdict(replace(self, masks=None, phase_view=None))  # never deep-copy frames or masks
        d.pop("masks")
        d.pop("phase_view")
        return d


def _cine_facts(cine: Cine) -> dict:
    T, H, W = cine.shape
    return {"frames": T, "height": H, "width": W, "fps": round(cine.fps, 4),
            "duration_s": round(cine.duration_s, 4),
            "spacing_mm": list(cine.spacing_mm) if cine.spacing_mm else None,
            "has_ecg": cine.ecg is not None, "format": cine.source.format}


def quality_flags(cine: Cine) -> list[dict]:
    """Flags that need no model: wrong modality, a still image, unknown spacing, no ECG."""
    flags = []
    modality = str(cine.source.extra.get("modality", "")).upper()
    if modality and modality != "US":
        flags.append(flag("not_echo", f"DICOM modality {modality}, not ultrasound"))
    if cine.num_frames < 2:
        flags.append(flag("single_frame", "a still image: no ED/ES, no volumes over time"))
    for key in ("truncated", "frame_count_mismatch"):     # set by the readers (io.video, io.dicom)
        if cine.source.extra.get(key):
            flags.append(flag(key, str(cine.source.extra[key])))
    if cine.spacing_mm is None:
        flags.append(flag("unknown_spacing", "volumes in pixel units, not ml"))
    if cine.ecg is None:
        flags.append(flag("no_ecg", "no ECG in the file: ED/ES from the images"))
    return flags


def gate_input(cine: Cine) -> tuple[Cine, dict, list]:
    """Multi-panel layouts cut to the B-mode panel (ValueError with the reason when none is B-mode)
    and colour Doppler flagged: (cine to analyse, panel facts or {}, flags)."""
    flags, panel = [], {}
    panels = find_panels(cine.frames)
    if len(panels) > 1:
        best, why = choose_bmode_panel(cine.frames, panels)
        if best is None:
            raise ValueError(f"multi-panel layout refused: {why}")
        c0, c1 = panels[best]
        panel = {"columns": [int(c0), int(c1)], "panels": [list(map(int, p)) for p in panels],
                 "original_width": int(cine.shape[2])}
        cine = dataclasses.replace(cine, frames=np.ascontiguousarray(cine.frames[:, :, c0:c1]))
        flags.append(flag("multi_panel", why))
    colour = colour_doppler_frames(cine.frames, find_sector(cine.frames))
    if colour:
        flags.append(flag("colour_doppler", f"{len(colour)} of {cine.num_frames} frames hold a colour Doppler box: "
                                            "the LV/LA outlines and volumes of B-mode methods do not apply"))
    return cine, panel, flags


def check_masks(masks, cine: Cine) -> np.ndarray:
    """User masks ``[T, H, W]`` (labels 0-3, zero on unlabelled frames) checked against the cine."""
    m = np.asarray(masks)
    if m.ndim == 2 and cine.num_frames == 1:
        m = m[None]
    if m.shape != cine.shape:
        raise ValueError(f"masks have shape {m.shape} but the cine is {cine.shape} (frames, rows, cols)")
    top = LABELS[-1].value
    if m.min() < 0 or m.max() > top:
        raise ValueError(f"mask labels must lie in 0-{top} ({LABEL_TEXT}), "
                         f"found {int(m.min())}..{int(m.max())}")
    return m.astype(np.uint8)


class ModelSet(dict):
    """Loaded models by task, plus why the missing ones are missing (``reasons``)."""

    def __init__(self, models=(), reasons=None):
        super().__init__(models)
        self.reasons = dict(reasons or {})


def load_models(models=None, device: str = "auto", tasks=CINE_TASKS) -> ModelSet:
    """Load every task model a models folder holds, once (for batches and interactive use)."""
    store = models if isinstance(models, ModelStore) else ModelStore(models)
    dev = resolve_device(device)

    loaded = ModelSet(reasons=store.missing(tasks))
    loaded.provenance = {}
    entries = store.entries()
    for task in tasks:
        try:      # a model that cannot load disables its task (named in `needs`); the rest still runs
            path = store.get(task)
            if path is not None:
                loaded[task] = load_task_model(path, task=task, map_location="cpu").to(dev).eval()
                loaded.provenance[task] = model_provenance(task, getattr(loaded[task], "description", None),
                                                           entries.get(task))
        except Exception as e:  # noqa: BLE001
            loaded.reasons[task] = f"the '{task}' model could not be loaded: {e}"

    share_encoders(loaded)          # heads on one frozen encoder keep one copy of it in memory
    if embedding.phase_encoder(loaded)[0] is None:   # no task model's encoder: the folder's pretrained one (issue 11)
        try:
            enc, loaded.phase_encoder_source = embedding.load_store_encoder(store)
            loaded.phase_encoder = None if enc is None else enc.to(dev)
        except Exception as e:  # noqa: BLE001 - a bad encoder file disables only its heartbeat signal
            loaded.phase_encoder_error = f"the pretrained encoder could not be loaded: {e}"
    return loaded


def _clip_score(task: str, per_window: np.ndarray, model) -> dict:
    """A clip model's result over the cycle windows: classes -> the label and mean probabilities,
    a regression -> the mean value (named by the task's output) and each window's."""
    spec = get_task(task)
    if spec.kind == REGRESSION:
        return {spec.classes[0]: float(np.mean(per_window)), "per_window": [float(v) for v in per_window]}
    p = per_window.mean(0)
    labels = model.description["labels"]
    return {"label": labels[int(np.argmax(p))], "probabilities": dict(zip(labels, map(float, p)))}


def _load(models: Mapping, task: str, device, needs: dict):
    """The ``task`` model, else None with the reason recorded in ``needs``."""
    model = models.get(task)
    if model is None:
        needs[task] = getattr(models, "reasons", {}).get(task, f"no '{task}' model given")
        return None
    return model.to(device).eval()


def _view_gate(res: StudyResult, view: Optional[str], source: str) -> Optional[str]:
    """Why apical measurements must not run (None: they may). Adds the view flags to ``res``."""
    if view is not None:                       # the user said which view this is
        res.view = dict(res.view or {}, user_label=view)
        if view not in APICAL_VIEWS:
            return f"the user gave view {view}: volumes by the method of discs need an apical view"
        return None
    if res.view is None:
        plaus.merge(res.flags, [flag("view_unverified", "no view model: the apical view that volumes assume is "
                                                        "not checked (pass --view A4C when you know it)")])
        return None
    label, p = res.view["label"], max(res.view["probabilities"].values())
    if label not in APICAL_VIEWS or p < LOW_CONFIDENCE:
        why = (f"the view model says {label} (p={p:.2f}); volumes by the method of discs need an apical view "
               f"with p >= {LOW_CONFIDENCE} (pass --view A4C to override)")
        plaus.merge(res.flags, [flag("view_not_apical", why)])
        return why if source == "model" else None      # the user's own masks are measured, flagged
    return None


def analyze(cine_or_path: Union[Cine, str, Path], models: Union[str, Path, ModelStore, Mapping, None] = None,
            device: str = "auto", masks=None, segment: str = "ed_es",
            max_cycles: Optional[int] = None, view: Optional[str] = None) -> StudyResult:
    """Analyse one cine loop.

    ``models``: a models folder (default ``$ECHOFM_MODELS`` or ``~/.echofm/models``), a
    :class:`ModelStore`, or ``{task: model}`` of loaded models carrying their ``description``;
    ``masks``: optional label maps ``[T, H, W]`` from the user (used instead of a segmenter), or
    ``{frame: [H, W] label map}`` for a few drawn frames, propagated to every frame first;
    ``segment``: ``"ed_es"`` (segment the ED and ES frames) or ``"all"`` (every frame);
    ``max_cycles``: run the models on the first N full cycles only (faster; default: every cycle);
    ``view``: the view as the user knows it (e.g. ``"A4C"``), instead of the view model's.
    Raises :class:`~EchoFMEngine.cine.CineReadError` for an unreadable file and ValueError for
    masks that do not match the frames or a multi-panel file without a B-mode panel; everything
    else is reported through flags."""
    if segment not in ("ed_es", "all"):
        raise ValueError(f"segment must be 'ed_es' or 'all', got {segment!r}")
    if view is not None and view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    t0 = time.perf_counter()
    cine = cine_or_path if isinstance(cine_or_path, Cine) else load_cine(cine_or_path)
    t_read = time.perf_counter() - t0 if not isinstance(cine_or_path, Cine) else 0.0
    t = time.perf_counter()
    original_shape = cine.shape
    cine, panel, gate_flags = gate_input(cine)
    res = StudyResult(input="study", cine=_cine_facts(cine), flags=quality_flags(cine) + gate_flags)
    if panel:
        res.cine["panel"] = panel
    res.timing_s["read"] = t_read
    known_frames = None
    if isinstance(masks, Mapping):   # {frame: label map}: propagated to every frame (issue 12)
        # deferred: clinical.propagate loads SimpleITK (slow), needed only when masks are given
        from ..clinical.propagate import propagate_masks

        known_frames = sorted(int(k) for k in masks)
        if panel:
            c0, c1 = panel["columns"]
            masks = {k: np.asarray(v)[:, c0:c1] for k, v in masks.items()}
        masks = propagate_masks(cine, masks)
    elif masks is not None and panel and np.shape(masks) == tuple(original_shape):
        c0, c1 = panel["columns"]
        masks = np.asarray(masks)[:, :, c0:c1]
    user_masks = check_masks(masks, cine) if masks is not None else None
    res.timing_s["check_input"] = time.perf_counter() - t
    dev = resolve_device(device)
    t = time.perf_counter()
    store = models if isinstance(models, Mapping) else load_models(models, device)
    res.timing_s["load_models"] = time.perf_counter() - t
    cache: dict = {}
    prov_models = models_provenance(store)
    res.provenance = {"models": {}, "ed_es_method": None, "segmentation_method": None,
                      "view_source": "user" if view is not None else None}

    def used(task):          # provenance of a model whose output is in the result
        res.provenance["models"][task] = prov_models.get(task)

    if cine.num_frames < 2:
        res.needs["phase"] = "ED/ES need a cine loop of at least two frames"
        if user_masks is not None:
            res.flags.append(flag("masks_unused", "a single frame has no ED/ES"))
        res.timing_s["total"] = time.perf_counter() - t0
        res.timing_s = {k: round(v, 4) for k, v in res.timing_s.items()}
        return res

    # ED/ES without a segmenter first (ECG, else images); refined below when masks arrive.
    t = time.perf_counter()
    encoder, encoder_source = embedding.phase_encoder(store)   # the encoder's frame embeddings: one more image signal
    extra = embedding.encoder_signals(cine, encoder) if user_masks is None and cine.ecg is None else {}
    if getattr(store, "phase_encoder_error", None):
        res.flags.append(flag("encoder_not_loaded", store.phase_encoder_error))
    phase = detect_ed_es(cine, masks=user_masks, extra_signals=extra)
    res.timing_s["phase"] = time.perf_counter() - t
    cycles = [(a, b) for a, b in zip(phase.ed_frames[:-1], phase.ed_frames[1:])]
    if max_cycles is not None and cycles:
        cycles = cycles[:max(1, int(max_cycles))]
    span = (cycles[0][0], cycles[-1][1]) if cycles else (0, cine.num_frames - 1)
    period = float(np.median(np.diff(phase.ed_frames))) if len(phase.ed_frames) > 1 else None

    # View and disease scores: classifiers over one window per cycle, probabilities averaged.
    # Heads on identical encoder weights share one encoder pass per window (inference.encoder_groups).
    t = time.perf_counter()
    clip_models = {}
    for task in CLIP_TASKS:
        model = _load(store, task, dev, res.needs)
        if model is not None:
            clip_models[task] = model
    outputs = {}
    for group in inference.encoder_groups(clip_models):
        members = [clip_models[k] for k in group]
        prepared = inference.prepare(cine, inference.input_size(members[0])[1], cache)
        tg = time.perf_counter()
        outputs.update(zip(group, inference.shared_clip_outputs(members, cine, prepared, cycles, dev)))
        res.timing_s["model:" + "+".join(group)] = time.perf_counter() - tg
    if "view" in outputs:
        res.view = {**_clip_score("view", outputs["view"], clip_models["view"]), "windows": len(cycles) or 1}
        used("view")
        res.provenance["view_source"] = "model"
        top = max(res.view["probabilities"].values())
        if top < LOW_CONFIDENCE:
            res.flags.append(flag("low_view_confidence", f"the view model's top probability is {top:.2f}"))
    for task in CLIP_TASKS:
        key = get_task(task).score_key
        if key and task in outputs:
            res.scores[key] = _clip_score(task, outputs[task], clip_models[task])
            used(task)
    res.needs.update({t.name: t.analysis_note for t in TASKS if not t.analysis})   # AR: per study, not per cine
    res.timing_s["classify"] = time.perf_counter() - t

    # View gating: volumes by the method of discs only for an apical view (model or user says so).
    source = "user" if known_frames is None else "propagated"
    not_apical = _view_gate(res, view, "user" if user_masks is not None else "model")

    # Masks: the user's, else the segmenter's (ED/ES or every frame).
    t = time.perf_counter()
    labels_map = user_masks
    if labels_map is None and not_apical:
        res.needs["segment"] = f"not segmented: {not_apical}"
    elif labels_map is None:
        seg_model = _load(store, "segment", dev, res.needs)
        if seg_model is not None:
            _, size = inference.input_size(seg_model)
            prepared = inference.prepare(cine, size, cache)
            if segment == "all" or not phase.ed_frames:
                wanted = list(range(cine.num_frames))
            else:
                wanted = sorted(f for f in set(phase.ed_frames) | set(phase.es_frames) if span[0] <= f <= span[1])
            ts = time.perf_counter()
            labels_map = inference.segment_frames(seg_model, cine, prepared, wanted, period, dev)
            res.timing_s["model:segment"] = time.perf_counter() - ts
            source = "model"
            used("segment")
            if segment == "all" and cine.ecg is None:   # the LV area curve is a better ED/ES cue than pixels
                phase = detect_ed_es(cine, masks=labels_map, extra_signals=extra)
    res.timing_s["segment"] = time.perf_counter() - t
    res.phase = phase.to_dict()
    res.phase_view = (cine, phase)
    res.phase["analysed_cycles"] = [list(c) for c in cycles]
    plaus.merge(res.flags, getattr(phase, "flags", []))
    if len(phase.ed_frames) < 2:
        res.flags.append(flag("no_full_cycle", "fewer than two ED frames in the clip"))
    res.provenance["ed_es_method"] = {"method": phase.method, "signal": getattr(phase, "signal_name", None),
                                      "encoder_signal_from": encoder_source if extra else None}

    sector = None
    if labels_map is not None:
        frames = [int(f) for f in np.flatnonzero(labels_map.reshape(cine.num_frames, -1).any(1))]
        res.masks = labels_map
        res.segmentation = {"source": source, "frames": frames, "labels": SEGMENT_LABELS}
        if known_frames is not None:
            res.segmentation.update(segmentation_method="propagated", known_frames=known_frames)
        seg_prov = prov_models.get("segment") if source == "model" else None
        res.provenance["segmentation_method"] = (
            {"source": "model", "sha256": (seg_prov or {}).get("sha256"), "frames": segment} if source == "model"
            else {"source": source, "known_frames": known_frames})
        t = time.perf_counter()
        try:
            res.measurements = cardiac_measurements(labels_map, cine.spacing_mm, phase.ed_frames, phase.es_frames,
                                                   expected_shape=cine.shape)
        except ValueError as e:     # e.g. an empty LV mask at ED: say so, do not guess
            res.flags.append(flag("measurement_failed", str(e)))
        res.timing_s["measure"] = time.perf_counter() - t
    else:
        res.needs.setdefault("measurements", "volumes and EF need LV masks: a 'segment' model or masks given "
                                             "by the user")

    # Plausibility, then reliability of every reported number.
    t = time.perf_counter()
    if labels_map is not None:
        sector = find_sector(cine.frames)
    phantom = is_phantom_cine(cine)
    for task, prov in res.provenance["models"].items():
        if prov and prov.get("trained_on_phantoms") and not phantom:
            plaus.merge(res.flags, [flag("phantom_model_on_real_cine",
                                         f"the {task} model was trained on phantoms ({prov.get('trained_on')}) "
                                         "and applied to a real cine: its output does not carry over")])
    plaus.merge(res.flags, plaus.check_result(res.to_dict(), labels_map, sector, cine.fps))
    counted = res.flags
    if source != "model" and labels_map is not None:     # the user's own masks: the view is the user's call
        counted = [f for f in res.flags if f["name"] != "view_unverified"]
    rel = plaus.reliability(counted)
    if res.phase is not None:
        res.phase["heart_rate_reliable"] = rel["heart_rate_bpm"]["reliable"]
    if res.measurements is not None:
        res.measurements["reliable"] = {k: rel[k]["reliable"] for k in plaus.MEASURED}
        res.measurements["unreliable_because"] = {k: rel[k]["because"] for k in plaus.MEASURED if rel[k]["because"]}
    res.timing_s["checks"] = time.perf_counter() - t
    res.timing_s["total"] = time.perf_counter() - t0
    res.timing_s = {k: round(v, 4) for k, v in res.timing_s.items()}
    return res
