"""The demo behind `python train.py`: phantom studies -> pretrain a tiny EchoFM -> fine-tune a
segmentation head -> evaluate on held-out phantoms -> report.

Writes a run folder with the pretrained model (safetensors + JSON), ``metrics.json``, the loss
curve and the temporal self-similarity of the learned frame embeddings on a held-out phantom
(the periodicity picture of the paper's Fig. 5), compared with the same model before training;
then a segmentation head fine-tuned by the general fine-tuning loop (``segment/``: the task
checkpoint ``segment/model``, its ``metrics.json`` and ``log.csv``), its held-out scores under
``"segment"`` in ``metrics.json`` and ``segmentation.png`` (held-out ED/ES frames, true and
predicted contours); finally the segmenter is imported into a models folder (``models/``) and a
held-out phantom DICOM study is analysed end to end (``analysis/``, found vs true ED/ES and EF
under ``"analysis"``). The segmentation run is overridden with ``segment.KEY=VALUE``: KEY is any
fine-tuning config key (``segment.run.steps=20``, see :data:`SEGMENT_DEFAULTS`) or one of the short
names in :data:`SEGMENT_ALIASES` (``segment.steps=20``).
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from .analysis import analyze_paths
from .clinical.phantoms import make_study, write_dicom
from .configs import shipped
from .models import EchoFM, load_pretrained
from .models.registry import ModelStore
from .models.task_checkpoint import load_task_model
from .training import finetune
from .training.config import ConfigError, load_config, parse_override
from .training.data import phantom_clip
from .training.pretrain import pretrain
from .training.segment import STRUCTURES, evaluate_segmentation, predict_items
from .training.task_data import SPLIT_SEEDS, phantom_task_items

DEMO_CONFIG = shipped("demo")         # package data, found from a checkout and an installed wheel alike
# The demo's segmentation run: fine-tuning config keys and values (segment.KEY=VALUE overrides them).
# Full fine-tuning beat a frozen encoder on held-out Dice at the same budget (docs/segmentation.md).
SEGMENT_DEFAULTS = {"data.n_train": 16, "data.n_val": 4, "data.n_test": 6, "data.seed": 0, "run.steps": 300,
                    "optim.lr": 1.0e-3, "run.batch_size": 4, "head.mode": "full", "optim.layer_decay": 0.75,
                    "optim.warmup_steps": 20, "run.seed": 0, "run.eval_every": 50, "run.log_every": 10,
                    "run.ckpt_every": 100}
# Short names the demo has always taken (segment.steps=20) -> the config key they set.
SEGMENT_ALIASES = {"steps": "run.steps", "n_train": "data.n_train", "n_test": "data.n_test", "lr": "optim.lr",
                   "batch_size": "run.batch_size", "layer_decay": "optim.layer_decay", "seed": "run.seed",
                   "freeze_encoder": "head.mode"}


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


HELD_OUT_CLIP_0 = "held-out phantom clip 1 of 4 (A4C, 60 bpm, EF 45 %, 2 cycles)"  # held_out_clips()[0]


def periodicity_score(model: EchoFM, clips: torch.Tensor, phases: np.ndarray) -> tuple[float, np.ndarray]:
    """Spearman correlation between embedding similarity and cardiac-phase similarity.

    Phase similarity of two temporal indices = minus the circular distance of the phases of their
    middle frames; a model that has learned periodicity ranks same-phase pairs as most similar.
    """
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
    import matplotlib  # deferred: matplotlib, loaded only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above

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
                    scores: tuple[float, float], clip: str = "held-out phantom clip") -> None:
    """Frame-embedding self-similarity of one held-out clip before and after pretraining, on one
    colour scale, next to the true cardiac phase of the same temporal indices."""
    import matplotlib  # deferred: matplotlib, as above
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above

    t = before.shape[0]
    per_token = len(phase) // t
    token_phase = phase[per_token // 2::per_token][:t]    # phase of each token's middle frame (as scored)
    off = ~np.eye(t, dtype=bool)

    def ranks(sim):  # percentile rank of each pair's similarity within the clip: what Spearman's rho compares
        r = np.ones_like(sim, dtype=float)
        order = np.argsort(np.argsort(sim[off]))
        r[off] = order / max(1, off.sum() - 1)
        return r
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 1.05]})
    for ax, sim, name, rho in ((axes[0], before, "random init", scores[0]), (axes[1], after, "pretrained", scores[1])):
        title = f"{name}: Spearman rho = {rho:.2f}\n(cosine {sim[off].min():.4f} to {sim[off].max():.4f})"
        im = ax.imshow(ranks(sim), cmap="viridis", vmin=0.0, vmax=1.0, origin="upper")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("temporal index (token)")
        ax.set_ylabel("temporal index (token)")
        ax.set_xticks(range(0, t, max(1, t // 4)))
        ax.set_yticks(range(0, t, max(1, t // 4)))
    fig.colorbar(im, ax=list(axes[:2]), shrink=0.85,
                 label="similarity rank within the matrix\n(0 = least, 1 = most similar pair)")
    axes[2].plot(range(t), token_phase, "o-", color="tab:red")
    axes[2].set_xlim(-0.5, t - 0.5)
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_xticks(range(0, t, max(1, t // 4)))
    axes[2].set_xlabel("temporal index (token)")
    axes[2].set_ylabel("cardiac phase (0 = R peak / ED, 1 = next R)")
    axes[2].set_title("true cardiac phase of each token", fontsize=10)
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"Temporal self-similarity of EchoFM frame embeddings: {clip} "
                 f"({len(phase)} frames, {per_token} per token)", fontsize=11)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    return float(2 * inter / total) if total else 1.0


def plot_segmentation(item: dict, pred: np.ndarray, out_png: Path, scores: dict, clip: str = "") -> None:
    """The labelled (ED and ES) frames of one held-out clip: truth filled, prediction outlined,
    with this clip's Dice per structure (the held-out set's mean in the title)."""
    import matplotlib  # deferred: matplotlib, as above
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above
    from matplotlib.colors import to_rgba  # deferred: as above
    from matplotlib.lines import Line2D  # deferred: as above
    from matplotlib.patches import Patch  # deferred: as above


    colours = {"lv_endo": "tab:red", "lv_epi": "tab:orange", "la": "tab:cyan"}
    names = {"lv_endo": "LV cavity", "lv_epi": "LV epicardium", "la": "LA"}
    masks = item["masks"].numpy()
    frames = np.flatnonzero(item["mask_valid"].numpy())
    area = np.array([np.isin(masks[t], STRUCTURES["lv_endo"]).sum() for t in frames], float)
    mid = (area.min() + area.max()) / 2
    phase = ["ED" if a >= mid else "ES" for a in area]   # phantom ED = largest LV, ES = smallest
    clip_dice = {s: _dice(np.isin(masks[frames], lab), np.isin(pred[frames], lab)) for s, lab in STRUCTURES.items()}
    fig, axes = plt.subplots(1, len(frames), figsize=(3.7 * len(frames), 4.6), squeeze=False, layout="constrained")
    for ax, t, ph in zip(axes[0], frames, phase):
        ax.imshow(item["video"][:, t].permute(1, 2, 0).numpy().mean(-1), cmap="gray", interpolation="bilinear")
        for s in ("lv_epi", "la", "lv_endo"):                      # outer first, the cavity on top
            truth = np.isin(masks[t], STRUCTURES[s])
            overlay = np.zeros(truth.shape + (4,))
            overlay[truth] = to_rgba(colours[s], 0.35)
            ax.imshow(overlay, interpolation="nearest")
            ax.contour(np.isin(pred[t], STRUCTURES[s]).astype(float), levels=[0.5], colors=colours[s],
                       linewidths=1.6)
        d = {s: _dice(np.isin(masks[t], lab), np.isin(pred[t], lab)) for s, lab in STRUCTURES.items()}
        ax.set_title(f"{ph}, frame {t}\nDice LV {d['lv_endo']:.2f} / epi {d['lv_epi']:.2f} / LA {d['la']:.2f}",
                     fontsize=9)
        ax.axis("off")
    handles = [Patch(facecolor=to_rgba(c, 0.35), edgecolor=c,
                     label=f"{names[s]}: this clip Dice {clip_dice[s]:.2f}") for s, c in colours.items()]
    handles += [Patch(facecolor=(0.5, 0.5, 0.5, 0.35), label="filled = truth"),
                Line2D([], [], color="0.3", lw=1.6, label="line = prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    mean = np.mean([scores[s]["dice"] for s in STRUCTURES])
    fig.suptitle(f"EchoFM segmentation head on a held-out phantom{' (' + clip + ')' if clip else ''}: "
                 f"ED/ES frames\n(held-out set mean Dice {mean:.2f}; ED = largest true LV, ES = smallest)",
                 fontsize=10)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def segmentation_demo(pretrain_cfg: dict, out: Path, settings: dict, progress: bool = True) -> dict:
    """Fine-tune a segmentation head on the pretrained encoder with the general fine-tuning loop
    (phantom ED/ES labels; validation picks the best step), report its held-out scores, plot one clip."""
    t0 = time.perf_counter()
    s = {**SEGMENT_DEFAULTS, **settings}
    r = pretrain_cfg["run"]
    cfg = load_config(None, ["task=segment", f"run.out={out / 'segment'}", f"init_from={out / 'pretrain' / 'model'}",
                             f"run.device={r['device']}", f"run.amp={r['amp']}",
                             *[f"{k}={json.dumps(v)}" for k, v in s.items()]])
    cfg["model"] = dict(pretrain_cfg["model"])           # the encoder just pretrained
    metrics = finetune.run(cfg, progress=progress)
    model = load_task_model(out / "segment" / "model", task="segment")
    c, d = model.cfg, cfg["data"]
    train = phantom_task_items("segment", d["n_train"], c.img_size, c.num_frames,
                               seed=10 * d["seed"] + SPLIT_SEEDS["train"])
    first = phantom_task_items("segment", 1, c.img_size, c.num_frames, seed=10 * d["seed"] + SPLIT_SEEDS["test"])[0]
    held_out = metrics["test"]
    on_train = evaluate_segmentation(model, train, n_boot=200)
    plot_segmentation(first, predict_items(model, [first])[0].numpy(), out / "segmentation.png",
                      held_out["structures"], clip=f"clip 1 of {d['n_test']}: {first['view']}, EF {first['ef']:.0f} %")
    hist = metrics["train_history"]
    short = {name: _value(cfg, key) for name, key in SEGMENT_ALIASES.items()}
    short["freeze_encoder"] = cfg["head"]["mode"] == "frozen"
    return {"settings": {**short, "config": s}, "mode": "frozen encoder" if short["freeze_encoder"] else
            "full fine-tuning", "first_loss": hist[0]["loss"], "final_loss": hist[-1]["loss"],
            "best_step": metrics["best_step"], "val_mean_dice": (metrics["val"] or {}).get("mean_dice"),
            "train_mean_dice": on_train["mean_dice"], "held_out": held_out,
            "checkpoint": str(out / "segment" / "model"), "train_seconds": metrics["train_seconds"],
            "seconds": time.perf_counter() - t0,
            "note": "Dice on the labelled (ED/ES) frames of held-out phantom clips; CIs bootstrap frames; "
                    f"losses are means over the first and the last {cfg['run']['log_every']} steps"}


def _value(cfg: dict, key: str):
    """The value of a dotted config key."""
    for k in key.split("."):
        cfg = cfg[k]
    return cfg


def analysis_demo(out: Path, seed: int = 4242) -> dict:
    """Import the fine-tuned segmenter into a models folder, write a held-out phantom DICOM study
    (with its ECG) and analyse it as a clinician would: ED/ES, masks, volumes and EF vs the truth."""
    t0 = time.perf_counter()
    store = ModelStore(out / "models")
    store.import_file(out / "segment" / "model", task="segment")
    study = make_study("A4C", n_frames=60, size=(160, 192), fps=30.0, heart_rate_bpm=70, ef=50.0, seed=seed)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    write_dicom(study, out / "studies" / "phantom_a4c.dcm")
    report = analyze_paths([out / "studies"], out / "analysis", models=store.folder, progress=False)
    if not report["done"]:
        raise RuntimeError(f"the demo's phantom study could not be analysed: {report['failed']}")
    result = json.loads((out / "analysis" / report["done"][0] / "result.json").read_text())
    m = result["measurements"] or {}
    return {"input": "studies/phantom_a4c.dcm (phantom with ECG)", "folder": str(out / "analysis"),
            "study": report["done"][0],
            "ed_frames": result["phase"]["ed_frames"], "true_ed_frames": [int(f) for f in study.ed_frames],
            "es_frames": result["phase"]["es_frames"], "true_es_frames": [int(f) for f in study.es_frames],
            "phase_method": result["phase"]["method"],
            "edv_ml": m.get("edv"), "esv_ml": m.get("esv"), "ef_percent": m.get("ef_percent"),
            "true": {"edv_ml": study.edv_ml, "esv_ml": study.esv_ml, "ef_percent": study.ef},
            "not_computed": result["needs"], "seconds": time.perf_counter() - t0}


def _split_overrides(overrides) -> tuple[list[str], dict]:
    """``segment.KEY=VALUE`` overrides of the segmentation run (KEY a fine-tuning config key or a
    short name of :data:`SEGMENT_ALIASES`; values parsed as YAML) apart from the pretraining ones.
    Unknown fine-tuning keys are refused by the config check, naming the closest known one."""
    rest, seg = [], {}
    for text in overrides:
        if not text.startswith("segment."):
            rest.append(text)
            continue
        keys, value = parse_override(text[len("segment."):])
        key = ".".join(keys)
        if key == "freeze_encoder":
            value = "frozen" if value else "full"
        if "." not in key and key not in SEGMENT_ALIASES:
            raise ConfigError(f"unknown segment setting {key!r}; give a fine-tuning config key "
                              f"(segment.run.steps=20) or one of {sorted(SEGMENT_ALIASES)}")
        seg[SEGMENT_ALIASES.get(key, key)] = value
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
    plot_similarity(sims_before[0], sims_after[0], phases[0], out / "self_similarity.png", (before, after),
                    clip=HELD_OUT_CLIP_0)
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
    metrics["segment"] = segmentation_demo(cfg, out, seg_settings, progress=progress)
    metrics["analysis"] = analysis_demo(out)
    metrics["seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python train.py demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example (a quick look, about a minute):\n  python train.py demo --out "
                                        "runs/demo_quick run.steps=5 segment.run.steps=5")
    ap.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="overrides of Resources/configs/demo.yaml (run.steps=50) and of the segmentation "
                         f"run (segment.KEY=VALUE: KEY a fine-tuning config key, e.g. segment.run.steps=50, or "
                         f"one of {', '.join(SEGMENT_ALIASES)})")
    a = ap.parse_intermixed_args(argv)
    metrics = run_demo(Path(a.out), a.overrides, progress=not a.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"demo finished: see {a.out}/metrics.json, loss_curve.png, self_similarity.png, segmentation.png "
          f"and {Path(a.out) / 'analysis' / metrics['analysis']['study']}/ (result.json, masks.nrrd, summary.png)")
    return 0
