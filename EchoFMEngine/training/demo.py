"""The demo behind `python train.py`: phantom studies -> pretrain a tiny EchoFM -> fine-tune a
segmentation head -> evaluate on held-out phantoms -> report.

Writes a run folder with the pretrained model (safetensors + JSON), ``metrics.json``, the loss
curve and the temporal self-similarity of the learned frame embeddings on a held-out phantom
(the periodicity picture of the paper's Fig. 5), compared with the same model before training;
then the fine-tuned segmenter (``segment/model``), its held-out scores under ``"segment"`` in
``metrics.json`` and ``segmentation.png`` (held-out ED/ES frames, true and predicted contours);
finally the segmenter is imported into a models folder (``models/``) and a held-out phantom
DICOM study is analysed end to end (``analysis/``, found vs true ED/ES and EF under ``"analysis"``).
Segmentation settings are overridden with ``segment.KEY=VALUE`` (keys of ``SEGMENT_DEFAULTS``).
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..models import EchoFM, load_pretrained
from .config import load_config
from .data import phantom_clip
from .pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "Resources" / "configs" / "demo.yaml"
# Full fine-tuning beat a frozen encoder on held-out Dice at the same budget (docs/segmentation.md).
SEGMENT_DEFAULTS = {"n_train": 16, "n_test": 6, "steps": 300, "lr": 1.0e-3, "batch_size": 4,
                    "freeze_encoder": False, "layer_decay": 0.75, "seed": 0}


def cardiac_phase(frame_times_s: np.ndarray, r_peaks_s: np.ndarray) -> np.ndarray:
    """Position of each frame in its R-R interval, in [0, 1) (0 = R peak = end-diastole)."""
    i = np.clip(np.searchsorted(r_peaks_s, frame_times_s, side="right") - 1, 0, len(r_peaks_s) - 2)
    return np.clip((frame_times_s - r_peaks_s[i]) / (r_peaks_s[i + 1] - r_peaks_s[i]), 0, 1) % 1.0


def held_out_clips(cfg, n: int = 4, seed: int = 999) -> tuple[torch.Tensor, np.ndarray]:
    """Phantom clips unseen in training (two cycles each) with the true cardiac phase of every frame."""
    clips, phases = [], []
    for i in range(n):
        video, study, _ = phantom_clip(("A4C", "A2C")[i % 2], cfg.num_frames, cfg.img_size, 60.0 + 8 * i,
                                       cycles=2.0, ef=45.0 + 5 * i, seed=seed + i)
        clips.append(video)
        phases.append(cardiac_phase(study.cine.frame_times_s, study.r_peak_times_s))
    return torch.stack(clips), np.stack(phases)


def periodicity_score(model: EchoFM, clips: torch.Tensor, phases: np.ndarray) -> tuple[float, np.ndarray]:
    """Spearman correlation between embedding similarity and cardiac-phase similarity.

    Phase similarity of two temporal indices = minus the circular distance of the phases of their
    middle frames; a model that has learned periodicity ranks same-phase pairs as most similar.
    """
    from scipy.stats import spearmanr

    model.eval()
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.frame_embeddings(clips), dim=-1)
        sims = (emb @ emb.transpose(1, 2)).numpy()
    t = sims.shape[1]
    per_token = phases.shape[1] // t
    mid = phases[:, per_token // 2::per_token][:, :t]
    off = ~np.eye(t, dtype=bool)
    scores = []
    for s, ph in zip(sims, mid):
        d = np.abs(ph[:, None] - ph[None, :])
        phase_sim = -np.minimum(d, 1 - d)
        scores.append(spearmanr(s[off], phase_sim[off]).statistic)
    return float(np.nanmean(scores)), sims


def plot_loss(log_csv: Path, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(log_csv)))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "recon", "contrastive"):
        if key in rows[0]:
            ax.plot(steps, [float(r[key]) for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("EchoFM pretraining on phantoms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def plot_similarity(before: np.ndarray, after: np.ndarray, phase: np.ndarray, out_png: Path,
                    scores: tuple[float, float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, sim, title in ((axes[0], before, f"random init (rho={scores[0]:.2f})"),
                           (axes[1], after, f"pretrained (rho={scores[1]:.2f})")):
        im = ax.imshow(sim, cmap="viridis")  # own colour range: an untrained model is near 1 everywhere
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("temporal index")
        ax.set_ylabel("temporal index")
        fig.colorbar(im, ax=ax, shrink=0.8)
    axes[2].plot(phase)
    axes[2].set_title("true cardiac phase (0 = R peak)", fontsize=10)
    axes[2].set_xlabel("frame")
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def plot_segmentation(item: dict, pred: np.ndarray, out_png: Path, scores: dict) -> None:
    """The labelled frames of one held-out clip with true (solid) and predicted (dashed) contours."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .segment import STRUCTURES

    colours = {"lv_endo": "tab:red", "lv_epi": "tab:orange", "la": "tab:cyan"}
    frames = np.flatnonzero(item["mask_valid"].numpy())[:3]
    fig, axes = plt.subplots(1, len(frames), figsize=(3.6 * len(frames), 3.9), squeeze=False)
    for ax, t in zip(axes[0], frames):
        ax.imshow(item["video"][:, t].permute(1, 2, 0).numpy(), interpolation="bilinear")
        for s, labels in STRUCTURES.items():
            for mask, style in ((item["masks"][t].numpy(), "solid"), (pred[t], "dashed")):
                ax.contour(np.isin(mask, labels).astype(float), levels=[0.5], colors=colours[s],
                           linestyles=style, linewidths=1.2)
        ax.set_title(f"held-out frame {t}", fontsize=10)
        ax.axis("off")
    handles = [Line2D([], [], color=c, label=f"{s} (held-out Dice {scores[s]['dice']:.2f})")
               for s, c in colours.items()]
    handles += [Line2D([], [], color="k", label="truth"), Line2D([], [], color="k", ls="--", label="predicted")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("EchoFM segmentation head on a held-out phantom", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def segmentation_demo(encoder: EchoFM, out: Path, settings: dict, progress: bool = True) -> dict:
    """Fine-tune a segmentation head on phantom ED/ES labels, evaluate on held-out phantoms, save."""
    from .segment import (evaluate_segmentation, finetune_segmentation, phantom_segmentation_items,
                          predict_items, save_segmenter)

    t0 = time.perf_counter()
    s = {**SEGMENT_DEFAULTS, **settings}
    c = encoder.cfg
    train = phantom_segmentation_items(s["n_train"], c.img_size, c.num_frames, seed=s["seed"] + 100)
    test = phantom_segmentation_items(s["n_test"], c.img_size, c.num_frames, seed=s["seed"] + 200)
    model = finetune_segmentation(encoder, train, steps=s["steps"], lr=s["lr"], batch_size=s["batch_size"],
                                  freeze_encoder=s["freeze_encoder"], seed=s["seed"],
                                  layer_decay=s["layer_decay"], log_every=50 if progress else 0)
    train_seconds = time.perf_counter() - t0
    held_out = evaluate_segmentation(model, test)
    on_train = evaluate_segmentation(model, train, n_boot=200)
    save_segmenter(model, out / "segment" / "model", extra={"trained_on": "EchoFM phantoms (demo)",
                                                            "held_out_mean_dice": held_out["mean_dice"]})
    plot_segmentation(test[0], predict_items(model, test[:1])[0].numpy(), out / "segmentation.png",
                      held_out["structures"])
    hist = model.history
    k = max(1, min(10, len(hist) // 4))
    return {"settings": s, "mode": "frozen encoder" if s["freeze_encoder"] else "full fine-tuning",
            "first_loss": float(np.mean(hist[:k])), "final_loss": float(np.mean(hist[-k:])),
            "train_mean_dice": on_train["mean_dice"], "held_out": held_out,
            "checkpoint": str(out / "segment" / "model"), "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
            "note": "Dice on the labelled (ED/ES) frames of held-out phantom clips; CIs bootstrap frames"}


def analysis_demo(out: Path, seed: int = 4242) -> dict:
    """Import the fine-tuned segmenter into a models folder, write a held-out phantom DICOM study
    (with its ECG) and analyse it as a clinician would: ED/ES, masks, volumes and EF vs the truth."""
    from ..analysis import analyze_paths
    from ..models.registry import ModelStore
    from ..synthetic import make_study, write_dicom

    t0 = time.perf_counter()
    store = ModelStore(out / "models")
    store.import_file(out / "segment" / "model", task="segment")
    study = make_study("A4C", n_frames=60, size=(160, 192), fps=30.0, heart_rate_bpm=70, ef=50.0, seed=seed)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    write_dicom(study, out / "studies" / "phantom_a4c.dcm")
    analyze_paths([out / "studies"], out / "analysis", models=store.folder, progress=False)
    result = json.loads((out / "analysis" / "phantom_a4c" / "result.json").read_text())
    m = result["measurements"] or {}
    return {"input": "studies/phantom_a4c.dcm (phantom with ECG)", "folder": str(out / "analysis"),
            "ed_frames": result["phase"]["ed_frames"], "true_ed_frames": [int(f) for f in study.ed_frames],
            "es_frames": result["phase"]["es_frames"], "true_es_frames": [int(f) for f in study.es_frames],
            "phase_method": result["phase"]["method"],
            "edv_ml": m.get("edv"), "esv_ml": m.get("esv"), "ef_percent": m.get("ef_percent"),
            "true": {"edv_ml": study.edv_ml, "esv_ml": study.esv_ml, "ef_percent": study.ef},
            "not_computed": result["needs"], "seconds": time.perf_counter() - t0}


def _split_overrides(overrides) -> tuple[list[str], dict]:
    """``segment.KEY=VALUE`` overrides (parsed as YAML scalars) apart from the config ones."""
    import yaml

    rest, seg = [], {}
    for text in overrides:
        if text.startswith("segment."):
            key, _, value = text[len("segment."):].partition("=")
            if key not in SEGMENT_DEFAULTS:
                raise KeyError(f"unknown segment setting {key!r}; choose from {sorted(SEGMENT_DEFAULTS)}")
            seg[key] = yaml.safe_load(value)
        else:
            rest.append(text)
    return rest, seg


def run_demo(out: Path, overrides: list[str] = (), progress: bool = True) -> dict:
    """Pretrain on phantoms, fine-tune and evaluate segmentation, analyse a held-out phantom study
    with the fine-tuned model, write the report into ``out``; returns the metrics."""
    t0 = time.perf_counter()
    out = Path(out)
    overrides, seg_settings = _split_overrides(overrides)
    cfg = load_config(DEMO_CONFIG, [f"run.out={out / 'pretrain'}", *overrides])
    summary = pretrain(cfg, progress=progress)
    model = load_pretrained(out / "pretrain" / "model")
    torch.manual_seed(cfg["run"]["seed"])
    untrained = EchoFM(model.cfg)
    clips, phases = held_out_clips(model.cfg)
    before, sims_before = periodicity_score(untrained, clips, phases)
    after, sims_after = periodicity_score(model, clips, phases)
    plot_loss(out / "pretrain" / "log.csv", out / "loss_curve.png")
    plot_similarity(sims_before[0], sims_after[0], phases[0], out / "self_similarity.png", (before, after))
    rows = list(csv.DictReader(open(out / "pretrain" / "log.csv")))
    metrics = {
        "pretrain": {"steps": summary["steps"], "clips_per_s": summary["clips_per_s"],
                     "first_loss": float(rows[0]["loss"]), "final_loss": float(rows[-1]["loss"]),
                     "first_recon": float(rows[0]["recon"]), "final_recon": float(rows[-1]["recon"])},
        "periodicity_spearman": {"random_init": before, "pretrained": after,
                                 "note": "rank correlation of frame-embedding similarity with true cardiac-phase "
                                         "similarity on 4 held-out phantom clips (2 cycles each)"},
        "checkpoint": str(out / "pretrain" / "model"),
    }
    metrics["segment"] = segmentation_demo(model, out, seg_settings, progress=progress)
    metrics["analysis"] = analysis_demo(out)
    metrics["seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python train.py demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example (a quick look, about a minute):\n  python train.py demo --out "
                                        "runs/demo_quick run.steps=5 segment.steps=5")
    ap.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="overrides of Resources/configs/demo.yaml (run.steps=50) and of the segmentation "
                         f"step (segment.KEY=VALUE, KEY one of {', '.join(SEGMENT_DEFAULTS)})")
    a = ap.parse_intermixed_args(argv)
    metrics = run_demo(Path(a.out), a.overrides, progress=not a.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"demo finished: see {a.out}/metrics.json, loss_curve.png, self_similarity.png, segmentation.png "
          f"and {a.out}/analysis/phantom_a4c/ (result.json, masks.nrrd, summary.png)")
    return 0
