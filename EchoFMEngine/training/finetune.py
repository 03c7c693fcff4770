"""Fine-tuning of the downstream tasks: view, segment, AS, AR, EF — one loop for all.

    python train.py --config Resources/configs/finetune_view.yaml [key=value ...] [--resume]
    python -m EchoFMEngine finetune --config ...

AdamW with layer-wise lr decay (frozen encoder: head only), linear warm-up + cosine per step
(timm), AMP and device handling as in pretraining, checkpoints every ``run.ckpt_every`` steps
(a killed run continues with ``--resume`` and ends exactly where an uninterrupted one would),
validation every ``run.eval_every`` steps with the best model kept, then the held-out test split,
``metrics.json`` and the self-describing model (``<run.out>/model``, contract C) written by
:func:`EchoFMEngine.models.task_checkpoint.save_task_model`.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..configs import CONFIG_DIR
from ..data.augment import classification_augment, segmentation_augment
from ..data.datasets import dataset_layout, dataset_names
from ..metrics import json_safe
from ..models import make_config
from ..models.checkpoint import CheckpointError
from ..models.heads import ENCODER_UNUSED, EncoderModel, build_new_task_model
from ..models.task_checkpoint import check_task, load_task_model, read_task_description, save_task_model
from ..runtime import distributed
from ..tasks import SEGMENTATION, get_task, structures_for
from .config import FINETUNE_TASKS, ConfigError, dump_config, load_config
from .data import StepBatchSampler, item_seed
from .layer_decay import param_groups
from .loop import (LossGuard, RunLog, apply_update, precision, progress_bar, resume_state, run_cli, run_parser,
                   save_state, training_run)
from .optim import build_scheduler
from .pretrain import build_model as build_encoder
from .task_data import (PROXY_NOTES, TaskData, build_task_data, items_task_data,  # noqa: F401 (public here)
                        phantom_task_items)
from .task_eval import collate, evaluate_task, is_better, select_metric, task_loss

MODES = ("full", "frozen")
CONFIGS = CONFIG_DIR   # finetune_*.yaml: package data (Resources/configs links here in a checkout)


# ------------------------------------------------------------------ the model
def is_task_checkpoint(path) -> bool:
    """True for a fine-tuned task checkpoint, False for anything else (an encoder, a released file)."""
    try:
        read_task_description(path)
        return True
    except CheckpointError:
        return False


def _frozen(cfg: dict) -> bool:
    mode = cfg["head"]["mode"]
    if mode not in MODES:
        raise ConfigError(f"head.mode must be one of {list(MODES)}, got {mode!r}")
    return mode == "frozen"


def build_task_model(cfg: dict, data: TaskData, encoder=None) -> EncoderModel:
    """The task model of ``cfg`` for ``data``: a new head on the (initialised) encoder, or a task
    checkpoint of the same task given as ``init_from`` to fine-tune further. ``encoder``: an EchoFM
    to put the head on instead of the one ``cfg`` describes (it becomes part of the model)."""
    task, h = cfg["task"], cfg["head"]
    frozen = _frozen(cfg)
    torch.manual_seed(int(cfg["run"]["seed"]))
    init = cfg.get("init_from")
    if init and is_task_checkpoint(init):
        model = load_task_model(init, task=task)
        labels = model.description["labels"]
        if list(labels) != list(data.labels):
            raise CheckpointError(f"{init}: the checkpoint's labels {labels} differ from the data's {data.labels}")
        return model.set_frozen(frozen).train()
    encoder = build_encoder(cfg) if encoder is None else encoder
    return build_new_task_model(encoder, task, len(data.labels), h, frozen, data.target_stats)


def model_input(cfg: dict) -> tuple[int, int, bool]:
    """(clip frames, size, per-frame segmenter?) of the run: from ``model`` and ``data.frames``, or
    from the description of a task checkpoint given as ``init_from`` (its shape wins)."""
    task, init = cfg["task"], cfg.get("init_from")
    if init and is_task_checkpoint(init):
        desc = read_task_description(init)
        check_task(desc, task, init)
        frame_model = desc["head"]["kind"] == "frame_segmenter"
        frames = int(cfg["data"]["frames"] or desc["input"]["frames"])
        size, native = int(desc["input"]["height"]), int(desc["input"]["frames"])
    else:
        mcfg = make_config(dict(cfg["model"]))
        frame_model = get_task(task).head_kind(cfg["head"]) == "frame_segmenter"
        frames = int(cfg["data"]["frames"] or mcfg.num_frames)
        size, native = mcfg.img_size, mcfg.num_frames
    if not frame_model and frames != native:
        raise ConfigError(f"data.frames={frames} differs from the model's {native} frames "
                          f"(only the per-frame segmenter takes clips of any length)")
    return frames, size, frame_model


def _scalars(m: Optional[dict]) -> Optional[dict]:
    """Numbers of a metrics dict (per-structure Dice for segmentation), for the description."""
    if m is None:
        return None
    out = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "structures" in m:
        out["dice"] = {s: v["dice"] for s, v in m["structures"].items()}
    return json_safe(out)


def model_description(model: EncoderModel, task: str, labels: Sequence[str], trained_on: str,
                      frames_policy: Optional[str] = None, frames: Optional[int] = None) -> dict:
    """What a task checkpoint says about ``model`` itself (contract C's required keys and the task's
    own ones, from its registry entry), for :func:`~EchoFMEngine.models.task_checkpoint.save_task_model`;
    ``frames``: the clip length it was trained on (default the encoder's); ``frames_policy``: how its
    clips were cut (default the task's)."""
    spec = get_task(task)
    frames_policy = frames_policy or spec.frames_policy
    kind = model.head_config()["kind"]
    layout = {"multiview": "[B, V, C, T, H, W] + view_mask [B, V] (views in the order of 'views')",
              "frame_segmenter": "[B, C, T, H, W], any T (each frame is segmented on its own)"}.get(kind,
                                                                                                  "[B, C, T, H, W]")
    frames, size = int(frames or model.cfg.num_frames), int(model.cfg.img_size)
    desc = {
        "task": task, "labels": list(labels),
        "input": {"frames": frames, "height": size, "width": size, "channels": 3,
                  "value_range": [0.0, 1.0], "layout": layout, "any_frames": kind == "frame_segmenter"},
        "preprocessing": {"sector_crop": True, "size": size, "frames_policy": frames_policy,
                          "clip_frames": frames, "color": "rgb"},
        "trained_on": trained_on,
    }
    if spec.vocabulary == "structures":
        desc["structures"] = {k: list(v) for k, v in structures_for(len(labels)).items()}
    if spec.unit:
        desc["unit"] = spec.unit
    if spec.views:
        desc["views"] = list(spec.views)
        desc["outputs"] = {"predict_proba": list(labels), "predict": "severity score, 0-4 (grade units)"}
    return desc


def describe(cfg: dict, data: TaskData, model: EncoderModel, val: dict, test: Optional[dict], best_step: int) -> dict:
    """The checkpoint description (contract C) of a finished run."""
    task = cfg["task"]
    desc = {
        **model_description(model, task, data.labels, data.trained_on, data.frames_policy, data.frames),
        "metrics": {"val": _scalars(val), "test": _scalars(test)},
        "training": {"mode": cfg["head"]["mode"], "steps": int(cfg["run"]["steps"]), "best_step": best_step,
                     "select_metric": select_metric(task, cfg["run"]["select_metric"])[0],
                     "label_fraction": float(cfg["data"]["label_fraction"]), "n_train": len(data.train),
                     "init_from": Path(cfg["init_from"]).name if cfg.get("init_from") else None,
                     "seed": int(cfg["run"]["seed"])},
        "notes": list(data.notes),
    }
    label_notes = dataset_layout(data.trained_on).task_notes(task) if data.trained_on in dataset_names() else []
    if label_notes:  # e.g. the phantoms' synthetic proxy labels
        desc["label_source"] = label_notes[0]
    return desc


def _reports_cis(task: str) -> bool:
    """Whether the task's test metrics carry bootstrap intervals (a ``*_ci95`` metric in its registry entry)."""
    return any(m.endswith("_ci95") for m in get_task(task).metrics)


# ------------------------------------------------------------------ augmentation
def augment(task: str, item: dict, seed: int, step: int) -> dict:
    """The paper's augmentation of one training item, drawn from a seed of (run, step, item) so a
    resumed run repeats it exactly: segmentation rotation/translation/scale/erasing (masks follow),
    other tasks horizontal flips."""
    g = torch.Generator().manual_seed(item_seed(seed, step, int(item["index"])))
    if get_task(task).kind == SEGMENTATION:
        return {**item, **segmentation_augment(g, erase_p=0.25)({"video": item["video"], "masks": item["masks"]})}
    return {**item, **classification_augment(g)({"video": item["video"]})}


# ------------------------------------------------------------------ the loop
def _trainable_keys(model: EncoderModel) -> list[str]:
    """State keys that training can change (frozen: the head only)."""
    skip = tuple(f"encoder.{u}" for u in ENCODER_UNUSED)
    return [k for k in model.state_dict() if not k.startswith(skip)
            and not (model.freeze_encoder and k.startswith("encoder."))]


def run(cfg: dict, resume: bool = False, progress: bool = True,
        on_step: Optional[Callable[[int], None]] = None) -> dict:
    """:func:`_run` in the process group torchrun describes (one process when not launched by it),
    rank 0 holding the run folder's lock; a refused lock stops every rank."""
    task = cfg.get("task")
    if task not in FINETUNE_TASKS:
        raise ConfigError(f"task {task!r} is not a fine-tuning task {list(FINETUNE_TASKS)}")
    with training_run(cfg["run"]["device"], cfg["run"]["out"], "fine-tuning") as info:
        return _run(cfg, info, resume, progress, on_step)


def fit(encoder, task: str, train_items: Sequence[dict], overrides: Sequence[str] = (),
        val_items: Optional[Sequence[dict]] = None, progress: bool = False) -> EncoderModel:
    """Fine-tune a new ``task`` head on a copy of ``encoder`` (the argument is not modified) with the
    loop :func:`run` uses, on items held in memory (the dataset layer's keys), without a run folder.

    ``overrides`` are fine-tuning config ``key=value`` strings (``run.steps=300``, ``optim.lr=1e-3``,
    ``head.mode=frozen``, ``data.augment=false``); with ``val_items`` the best validated model is
    returned, else the last. The logged losses are kept in ``model.history``."""
    cfg = load_config(None, [f"task={task}", *overrides])
    data = items_task_data(task, cfg["data"], train_items, val_items)
    info = distributed.setup(cfg["run"]["device"])
    model = build_task_model(cfg, data, encoder=copy.deepcopy(encoder)).to(info.device)
    result = train(cfg, data, model, info, out=None, progress=progress)
    model.history = [row["loss"] for row in result["history"]]
    return model.eval()


def _run(cfg: dict, info: distributed.DistInfo, resume: bool = False, progress: bool = True,
         on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Fine-tune ``cfg['task']`` as ``cfg`` says (the loaded config dict); returns the final metrics
    (also ``<run.out>/metrics.json``). ``resume`` continues from the newest checkpoint in
    ``run.out``; ``on_step(step)`` is called after every step (tests use it to interrupt a run)."""
    task = cfg["task"]
    t_start = time.perf_counter()
    r, d = cfg["run"], cfg["data"]
    out = Path(r["out"])
    main = info.is_main
    distributed.enable_fast_math(info.device)
    frames, size, frame_model = model_input(cfg)
    _frozen(cfg)
    data = build_task_data(task, d, frames, size, frame_model)
    model = build_task_model(cfg, data).to(info.device)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    result = train(cfg, data, model, info, out, resume, progress, on_step)
    best, autocast = result["best"], result["precision"].autocast
    test = None
    if data.test is not None and len(data.test):
        test = evaluate_task(model, task, data.test, int(r["eval_batch_size"]), info.device, autocast,
                             n_boot=1000 if _reports_cis(task) else 0, seed=int(r["seed"]), info=info, main_only=True)
        test = distributed.broadcast_object(json_safe(test), info)
    desc = describe(cfg, data, model, best["metrics"], test, int(best["step"]))
    if main:
        save_task_model(model, out / "model", desc)
    metrics = json_safe({
        "task": task, "labels": list(data.labels), "mode": cfg["head"]["mode"], "trained_on": data.trained_on,
        "select_metric": result["metric"], "best_step": int(best["step"]), "val": best["metrics"], "test": test,
        "n_train": len(data.train), "n_train_available": data.n_train_available, "n_val": len(data.val),
        "n_test": len(data.test) if data.test is not None else 0,
        "label_fraction": float(d["label_fraction"]), "steps": int(r["steps"]), "resumed_from": result["start"],
        "train_history": result["history"], "val_history": result["val_history"], "notes": data.notes,
        "train_seconds": result["train_seconds"], "seconds": time.perf_counter() - t_start,
        "device": str(info.device), "amp": str(result["precision"].dtype), "checkpoint": "model",
        "world_size": info.world_size,
    })
    if main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    distributed.barrier(info)
    return metrics


def train(cfg: dict, data: TaskData, model: EncoderModel, info: distributed.DistInfo, out: Optional[Path] = None,
          resume: bool = False, progress: bool = True, on_step: Optional[Callable[[int], None]] = None) -> dict:
    """The fine-tuning loop of every task: train ``model`` on ``data.train`` for ``run.steps`` steps,
    validate on ``data.val`` every ``run.eval_every`` steps keeping the best model, and leave
    ``model`` holding the best weights (the last ones without validation data), in eval mode.

    ``out`` holds the checkpoints (every ``run.ckpt_every`` steps; ``resume`` continues from the
    newest) and ``log.csv``; None: nothing is written. Under torchrun ``run.batch_size`` stays the
    global batch: each of N ranks takes its 1/N of the very batch one process would take (DDP
    averages the gradients), so 1 and N processes follow the same trajectory; validation covers the
    whole split. Returns ``best``, ``history``, ``val_history``, ``start``, ``metric``,
    ``train_seconds`` and the ``precision`` used."""
    task = cfg["task"]
    r, o, d = cfg["run"], cfg["optim"], cfg["data"]
    device, main = info.device, info.is_main
    steps, seed = int(r["steps"]), int(r["seed"])
    optimizer = torch.optim.AdamW(param_groups(model, float(o["lr"]), float(o["weight_decay"]),
                                               float(o["layer_decay"])), betas=tuple(o["betas"]),
                                  **({"fused": True} if device.type == "cuda" else {}))
    scheduler = build_scheduler(optimizer, steps, o)
    prec = precision(r["amp"], device)
    autocast = prec.autocast
    metric, higher = select_metric(task, r["select_metric"])
    keys = _trainable_keys(model)
    has_val = data.val is not None and len(data.val) > 0

    def snapshot() -> dict:
        sd = model.state_dict()
        return {k: sd[k].detach().cpu().clone() for k in keys}

    modules = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": prec.scaler}
    start, history, val_history = 0, [], []
    best = {"step": 0, "score": None, "metrics": None, "state": None}
    state = resume_state(out, info, modules, announce=progress) if resume and out is not None else None
    if state is not None:
        if state.get("task") != task:
            raise CheckpointError(f"{state['path']}: a {state.get('task')!r} run; this config is task {task!r}")
        start, history, val_history, best = int(state["step"]), state["history"], state["val_history"], \
            state["best"]
    log = RunLog(out, main, r["tensorboard"])
    log.truncate_after(start)

    bs = min(int(r["batch_size"]), len(data.train))          # the global batch
    if bs % info.world_size:
        raise ConfigError(f"run.batch_size {bs} (the global batch) does not split over {info.world_size} "
                          f"processes; use a multiple of {info.world_size}")
    sampler = StepBatchSampler(len(data.train), bs // info.world_size, info.rank, info.world_size, seed=seed,
                               start_micro_step=start)
    loader = DataLoader(data.train, batch_sampler=sampler, num_workers=int(d["num_workers"]), collate_fn=list,
                        persistent_workers=int(d["num_workers"]) > 0)
    batches = iter(loader)
    forward = model
    if info.enabled:
        forward = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=True)     # heads leave some encoder tensors unused
    if r["compile"]:
        forward = torch.compile(forward, mode=r["compile_mode"])
    guard = LossGuard(out, info, "lower optim.lr or use run.amp=fp32")

    def validate(step: int) -> None:
        guard.check()
        m = evaluate_task(model, task, data.val, int(r["eval_batch_size"]), device, autocast, info=info)
        if metric not in m:
            names = sorted(k for k, v in m.items() if isinstance(v, (int, float)))
            raise ConfigError(f"run.select_metric {metric!r} is not a validation metric of task {task!r}: {names}")
        val_history.append(json_safe({"step": step, metric: m.get(metric), "loss": m.get("loss")}))
        best_loss = (best["metrics"] or {}).get("loss")
        if is_better(m.get(metric), best["score"], higher, m.get("loss"), best_loss):
            best.update(step=step, score=m.get(metric), metrics=json_safe(m), state=snapshot())
        if progress and main:
            print(f"  val step {step}: {metric} {m.get(metric)} (best {best['score']} at step {best['step']})",
                  flush=True)

    def save(step: int) -> None:
        guard.check()                           # never checkpoint weights that saw a non-finite loss
        save_state(out, step, info, {**{k: v.state_dict() for k, v in modules.items()}, "task": task,
                                     "history": history, "val_history": val_history, "best": best,
                                     "config": json.dumps(cfg), "world_size": info.world_size},
                   keep_last=int(r["keep_last"]))

    bar = progress_bar(progress and main, steps, start, f"finetune {task}")
    aug = bool(d["augment"])
    skips_unlabelled = "mask_valid" in get_task(task).targets   # a batch may hold no labelled frame
    model.train()
    t_train, window = time.perf_counter(), []
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    def train_step(step: int) -> None:
        """One optimiser step on the next batch. A segmentation batch without labels is skipped
        (on one rank of several it still joins the gradient exchange, with a zero loss)."""
        items = next(batches)
        if aug:
            items = [augment(task, it, seed, step) for it in items]
        batch = collate(items, device)
        with autocast:
            loss = task_loss(model, task, batch, float(cfg["head"]["severity_weight"]), forward=forward)
        if info.enabled and skips_unlabelled:
            labelled = torch.tensor([float(loss is not None)], device=device)
            torch.distributed.all_reduce(labelled)
            if float(labelled) == 0:
                loss = None                                        # no rank has a label: every rank skips
            elif loss is None:                                     # join the all-reduce with zero gradients
                valid = torch.zeros_like(batch["mask_valid"])
                valid[0, 0] = True
                with autocast:
                    loss = forward(batch["video"], frames=valid).float().sum() * 0.0
        if loss is not None:
            guard.add(step + 1, loss)
            prec.scaler.scale(loss).backward()
            apply_update(prec, optimizer, trainable, o["clip_grad"])
            window.append(loss.detach().float())
        scheduler.step_update(step + 1)

    for step in range(start, steps):
        train_step(step)
        if (step + 1) % int(r["log_every"]) == 0 or step + 1 == steps:
            guard.check()
            mean = torch.stack(window).mean() if window else torch.tensor(math.nan, device=device)
            row = {"step": step + 1, "loss": float(distributed.all_reduce_mean(mean, info)),
                   "lr": optimizer.param_groups[-1]["lr"]}
            history.append(row)
            log.write(row)
            window = []
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4g}")
        if has_val and ((step + 1) % int(r["eval_every"]) == 0 or step + 1 == steps):
            validate(step + 1)
        if out is not None and (step + 1) % int(r["ckpt_every"]) == 0 and step + 1 < steps:
            save(step + 1)
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(step + 1)
    if bar is not None:
        bar.close()
    guard.check()
    train_seconds = time.perf_counter() - t_train
    if has_val and best["state"] is None:          # resumed after the last step, or steps == 0
        validate(steps)
    if best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)
    else:                                          # no validation data: the last weights
        best.update(step=steps)
    model.eval()
    return {"best": best, "history": history, "val_history": val_history, "start": start, "metric": metric,
            "train_seconds": train_seconds, "precision": prec}


# ------------------------------------------------------------------ command line
def parse_args(argv):
    ap = run_parser(
        "python -m EchoFMEngine finetune",
        "Fine-tune a downstream task from a config: the config's task: key is view, segment, as, ar or ef; "
        "init_from: names the pretrained encoder (or a task checkpoint to continue). Writes run.out/model (the "
        "task checkpoint for `evaluate` and `models import`) and metrics.json. Same as python train.py --config.",
        "example:\n  python -m EchoFMEngine finetune --config Resources/configs/finetune_view.yaml run.steps=5 "
        "run.out=runs/view_quick",
        "YAML config (Resources/configs/finetune_*.yaml; default: the view task on phantoms)",
        "key=value overrides, e.g. run.steps=50 head.mode=frozen")
    return ap.parse_intermixed_args(argv)   # overrides before or after the flags


def summary_line(metrics: dict) -> dict:
    """The headline numbers printed at the end of a run."""
    keep = ("accuracy", "auroc", "f1", "mae", "r2", "mean_dice", "severity_mae", "loss")
    out = {"task": metrics["task"], "best_step": metrics["best_step"]}
    for split in ("val", "test"):
        m = metrics.get(split) or {}
        out[split] = {k: round(m[k], 4) for k in keep if isinstance(m.get(k), float)}
    return out


def _report(cfg: dict, metrics: dict) -> None:
    print(json.dumps(summary_line(metrics)))
    print(f"model: {Path(cfg['run']['out']) / 'model'}; metrics: {Path(cfg['run']['out']) / 'metrics.json'}")


def cli(argv) -> int:
    """`python -m EchoFMEngine finetune`: exit 0 done, 1 run error, 2 bad config or a busy run folder."""
    return run_cli(parse_args(argv), run, _report)
