"""The demo behind `python train.py`: phantom studies -> pretrain a tiny EchoFM -> report.

Writes a run folder with the pretrained model (safetensors + JSON), ``metrics.json``, the loss
curve and the temporal self-similarity of the learned frame embeddings on a held-out phantom
(the periodicity picture of the paper's Fig. 5), compared with the same model before training.
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
from .pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "Resources" / "configs" / "demo.yaml"


def cardiac_phase(frame_times_s: np.ndarray, r_peaks_s: np.ndarray) -> np.ndarray:
    """Position of each frame in its R-R interval, in [0, 1) (0 = R peak = end-diastole)."""
    i = np.clip(np.searchsorted(r_peaks_s, frame_times_s, side="right") - 1, 0, len(r_peaks_s) - 2)
    return np.clip((frame_times_s - r_peaks_s[i]) / (r_peaks_s[i + 1] - r_peaks_s[i]), 0, 1) % 1.0


def held_out_clips(cfg, n: int = 4, seed: int = 999) -> tuple[torch.Tensor, np.ndarray]:
    """Phantom clips unseen in training (two cycles each) with the true cardiac phase of every frame."""
    from ..geometry import prepare_frames
    from ..synthetic import make_study

    clips, phases = [], []
    for i in range(n):
        hr = 60.0 + 8 * i
        fps = cfg.num_frames * hr / 60.0 / 2.0
        study = make_study(view=("A4C", "A2C")[i % 2], n_frames=cfg.num_frames,
                           size=(cfg.img_size * 2, cfg.img_size * 2), fps=fps, heart_rate_bpm=hr,
                           ef=45.0 + 5 * i, seed=seed + i)
        frames, _ = prepare_frames(study.cine.frames, cfg.img_size)
        clips.append(torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 255.0)
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


def run_demo(out: Path, overrides: list[str] = (), progress: bool = True) -> dict:
    """Pretrain on phantoms and write the report into ``out``; returns the metrics."""
    t0 = time.perf_counter()
    out = Path(out)
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
        "seconds": time.perf_counter() - t0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python train.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of Resources/configs/demo.yaml")
    a = ap.parse_args(argv)
    metrics = run_demo(Path(a.out), a.overrides, progress=not a.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"demo finished: see {a.out}/metrics.json, loss_curve.png, self_similarity.png")
    return 0
