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

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..atomic import LockedError
from ..configs import CONFIG_DIR
from ..data.labels import AR_VIEWS
from ..models.checkpoint import CheckpointError
from ..models.heads import EncoderModel, build_new_task_model
from ..models.task_checkpoint import check_task, read_task_description, save_task_model
from ..runtime import distributed
from . import checkpointing
from .config import FINETUNE_TASKS, ConfigError, dump_config, load_config
from .data import StepBatchSampler, item_seed
from .layer_decay import param_groups
from .optim import build_scheduler
from .pretrain import NonFiniteLoss, RunLog, _amp
from .pretrain import build_model as build_encoder
from .task_data import PROXY_NOTES, TaskData, build_task_data, phantom_task_items  # noqa: F401 (public here)
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


def build_task_model(cfg: dict, data: TaskData) -> EncoderModel:
    """The task model of ``cfg`` for ``data``: a new head on the (initialised) encoder, or a task
    checkpoint of the same task given as ``init_from`` to fine-tune further."""
    task, h = cfg["task"], cfg["head"]
    frozen = _frozen(cfg)
    torch.manual_seed(int(cfg["run"]["seed"]))
    init = cfg.get("init_from")
    if init and is_task_checkpoint(init):
        from ..models.task_checkpoint import load_task_model

        model = load_task_model(init, task=task)
        labels = model.description["labels"]
        if list(labels) != list(data.labels):
            raise CheckpointError(f"{init}: the checkpoint's labels {labels} differ from the data's {data.labels}")
        return model.set_frozen(frozen).train()
    return build_new_task_model(build_encoder(cfg), task, len(data.labels), h, frozen, data.target_stats)


def model_input(cfg: dict) -> tuple[int, int, bool]:
    """(clip frames, size, per-frame segmenter?) of the run: from ``model`` and ``data.frames``, or
    from the description of a task checkpoint given as ``init_from`` (its shape wins)."""
    from ..models import make_config

    task, init = cfg["task"], cfg.get("init_from")
    if init and is_task_checkpoint(init):
        desc = read_task_description(init)
        check_task(desc, task, init)
        frame_model = desc["head"]["kind"] == "frame_segmenter"
        frames = int(cfg["data"]["frames"] or desc["input"]["frames"])
        size, native = int(desc["input"]["height"]), int(desc["input"]["frames"])
    else:
        mcfg = make_config(dict(cfg["model"]))
        frame_model = task == "segment" and bool(cfg["head"]["frame_model"])
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


def describe(cfg: dict, data: TaskData, model: EncoderModel, val: dict, test: Optional[dict], best_step: int) -> dict:
    """The checkpoint description (contract C) of a finished run."""
    from .segment import structures_for

    task = cfg["task"]
    kind = model.head_config()["kind"]
    layout = {"multiview": "[B, V, C, T, H, W] + view_mask [B, V] (views in the order of 'views')",
              "frame_segmenter": "[B, C, T, H, W], any T (each frame is segmented on its own)"}.get(kind,
                                                                                                  "[B, C, T, H, W]")
    desc = {
        "task": task, "labels": list(data.labels),
        "input": {"frames": data.frames, "height": data.size, "width": data.size, "channels": 3,
                  "value_range": [0.0, 1.0], "layout": layout, "any_frames": kind == "frame_segmenter"},
        "preprocessing": {"sector_crop": True, "size": data.size, "frames_policy": data.frames_policy,
                          "clip_frames": data.frames, "color": "rgb"},
        "trained_on": data.trained_on,
        "metrics": {"val": _scalars(val), "test": _scalars(test)},
        "training": {"mode": cfg["head"]["mode"], "steps": int(cfg["run"]["steps"]), "best_step": best_step,
                     "select_metric": select_metric(task, cfg["run"]["select_metric"])[0],
                     "label_fraction": float(cfg["data"]["label_fraction"]), "n_train": len(data.train),
                     "init_from": Path(cfg["init_from"]).name if cfg.get("init_from") else None,
                     "seed": int(cfg["run"]["seed"])},
        "notes": list(data.notes),
    }
    if task == "segment":
        desc["structures"] = {k: list(v) for k, v in structures_for(len(data.labels)).items()}
    if task == "ef":
        desc["unit"] = "%"
    if task == "ar":
        desc["views"] = list(AR_VIEWS)
        desc["outputs"] = {"predict_proba": list(data.labels), "predict": "severity score, 0-4 (grade units)"}
    if data.trained_on == "phantom" and task in PROXY_NOTES:
        desc["label_source"] = PROXY_NOTES[task]
    return desc


def json_safe(x):
    """NaN / inf -> None, tuples -> lists, numpy scalars -> Python numbers (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ------------------------------------------------------------------ augmentation
def augment(task: str, item: dict, seed: int, step: int) -> dict:
    """The paper's augmentation of one training item, drawn from a seed of (run, step, item) so a
    resumed run repeats it exactly: segmentation rotation/translation/scale/erasing (masks follow),
    other tasks horizontal flips."""
    from ..data.augment import classification_augment, segmentation_augment

    g = torch.Generator().manual_seed(item_seed(seed, step, int(item["index"])))
    if task == "segment":
        return {**item, **segmentation_augment(g, erase_p=0.25)({"video": item["video"], "masks": item["masks"]})}
    return {**item, **classification_augment(g)({"video": item["video"]})}


# ------------------------------------------------------------------ the loop
def _trainable_keys(model: EncoderModel) -> list[str]:
    """State keys that training can change (frozen: the head only)."""
    from ..models.heads import ENCODER_UNUSED

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
    info = distributed.setup(cfg["run"]["device"])
    lock = None
    try:
        refused = None
        if info.is_main:
            try:
                lock = checkpointing.run_lock(cfg["run"]["out"], "fine-tuning")
            except LockedError as e:
                refused = str(e)
        refused = distributed.broadcast_object(refused, info)
        if refused is not None:
            raise LockedError(refused)
        return _run(cfg, info, resume, progress, on_step)
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()


def _run(cfg: dict, info: distributed.DistInfo, resume: bool = False, progress: bool = True,
         on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Fine-tune ``cfg['task']`` as ``cfg`` says (the loaded config dict); returns the final metrics
    (also ``<run.out>/metrics.json``). ``resume`` continues from the newest checkpoint in
    ``run.out``; ``on_step(step)`` is called after every step (tests use it to interrupt a run).

    Under torchrun ``run.batch_size`` stays the global batch: each of N ranks takes its 1/N of the
    very batch one process would take (DDP averages the gradients), so 1 and N processes follow
    the same trajectory; validation and test cover the whole split; only rank 0 writes."""
    task = cfg["task"]
    t_start = time.perf_counter()
    r, o, d = cfg["run"], cfg["optim"], cfg["data"]
    out = Path(r["out"])
    device = info.device
    main = info.is_main
    distributed.enable_fast_math(device)
    frames, size, frame_model = model_input(cfg)
    _frozen(cfg)
    data = build_task_data(task, d, frames, size, frame_model)
    model = build_task_model(cfg, data).to(device)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")

    steps, seed = int(r["steps"]), int(r["seed"])
    optimizer = torch.optim.AdamW(param_groups(model, float(o["lr"]), float(o["weight_decay"]),
                                               float(o["layer_decay"])), betas=tuple(o["betas"]),
                                  **({"fused": True} if device.type == "cuda" else {}))
    scheduler = build_scheduler(optimizer, steps, o)
    amp = _amp(r["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    metric, higher = select_metric(task, r["select_metric"])
    keys = _trainable_keys(model)

    def snapshot() -> dict:
        sd = model.state_dict()
        return {k: sd[k].detach().cpu().clone() for k in keys}

    start, history, val_history = 0, [], []
    best = {"step": 0, "score": None, "metrics": None, "state": None}
    if resume:
        state = checkpointing.load_latest(out, map_location="cpu")
        if state is not None:
            if state.get("task") != task:
                raise CheckpointError(f"{state['path']}: a {state.get('task')!r} run; this config is task {task!r}")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            distributed.restore_rng_state(state["rng"], info)
            start, history, val_history, best = int(state["step"]), state["history"], state["val_history"], \
                state["best"]
            if progress and main:
                print(f"resuming from {state['path']} at step {start}")
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
        from torch.nn.parallel import DistributedDataParallel as DDP
        forward = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=True)     # heads leave some encoder tensors unused

    def validate(step: int) -> None:
        check_finite()
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
        check_finite()                          # never checkpoint weights that saw a non-finite loss
        rngs = distributed.gather_rng_states(info)
        if main:
            checkpointing.save_checkpoint(out, step, {
                "task": task, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "rng": rngs, "history": history, "val_history": val_history, "best": best,
                "config": json.dumps(cfg), "world_size": info.world_size}, keep_last=int(r["keep_last"]))
        distributed.barrier(info)

    pending: list = []            # (step, loss) not yet checked: one host sync per log, not per step

    def check_finite() -> None:
        """Stop (on every rank) at the first non-finite loss since the last check."""
        ok, i = distributed.all_finite([v for _, v in pending], info)
        if not ok:
            last = checkpointing.list_checkpoints(out)
            raise NonFiniteLoss(f"non-finite loss at step {pending[i][0]}; stopping. Last good checkpoint: "
                                f"{last[-1] if last else 'none'} (lower optim.lr or use run.amp=fp32)")
        pending.clear()

    bar = None
    if progress and main and start < steps:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc=f"finetune {task}", dynamic_ncols=True, file=sys.stderr)
    aug = bool(d["augment"])
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
        if info.enabled and task == "segment":
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
            pending.append((step + 1, loss.detach()))
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if o["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(trainable, float(o["clip_grad"]))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach().float())
        scheduler.step_update(step + 1)

    for step in range(start, steps):
        train_step(step)
        if (step + 1) % int(r["log_every"]) == 0 or step + 1 == steps:
            check_finite()
            mean = torch.stack(window).mean() if window else torch.tensor(math.nan, device=device)
            row = {"step": step + 1, "loss": float(distributed.all_reduce_mean(mean, info)),
                   "lr": optimizer.param_groups[-1]["lr"]}
            history.append(row)
            log.write(row)
            window = []
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4g}")
        if (step + 1) % int(r["eval_every"]) == 0 or step + 1 == steps:
            validate(step + 1)
        if (step + 1) % int(r["ckpt_every"]) == 0 and step + 1 < steps:
            save(step + 1)
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(step + 1)
    if bar is not None:
        bar.close()
    check_finite()
    train_seconds = time.perf_counter() - t_train
    if best["state"] is None:                 # resumed after the last step, or steps == 0
        validate(steps)
    model.load_state_dict(best["state"], strict=False)
    model.eval()
    test = None
    if data.test is not None and len(data.test):
        test = evaluate_task(model, task, data.test, int(r["eval_batch_size"]), device, autocast,
                             n_boot=1000 if task == "segment" else 0, seed=seed, info=info, main_only=True)
        test = distributed.broadcast_object(json_safe(test), info)
    desc = describe(cfg, data, model, best["metrics"], test, int(best["step"]))
    if main:
        save_task_model(model, out / "model", desc)
    metrics = json_safe({
        "task": task, "labels": list(data.labels), "mode": cfg["head"]["mode"], "trained_on": data.trained_on,
        "select_metric": metric, "best_step": int(best["step"]), "val": best["metrics"], "test": test,
        "n_train": len(data.train), "n_train_available": data.n_train_available, "n_val": len(data.val),
        "n_test": len(data.test) if data.test is not None else 0,
        "label_fraction": float(d["label_fraction"]), "steps": steps, "resumed_from": start,
        "train_history": history, "val_history": val_history, "notes": data.notes,
        "train_seconds": train_seconds, "seconds": time.perf_counter() - t_start,
        "device": str(device), "amp": str(amp), "checkpoint": "model", "world_size": info.world_size,
    })
    if main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    distributed.barrier(info)
    return metrics


# ------------------------------------------------------------------ command line
def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m EchoFMEngine finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a downstream task from a config: the config's task: key is view, segment, as, ar "
                    "or ef; init_from: names the pretrained encoder (or a task checkpoint to continue). Writes "
                    "run.out/model (the task checkpoint for `evaluate` and `models import`) and metrics.json. "
                    "Same as python train.py --config.",
        epilog="example:\n  python -m EchoFMEngine finetune --config Resources/configs/finetune_view.yaml "
               "run.steps=5 run.out=runs/view_quick")
    ap.add_argument("--config", default=None, help="YAML config (Resources/configs/finetune_*.yaml; default: "
                                                   "the view task on phantoms)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=50 head.mode=frozen")
    return ap.parse_intermixed_args(argv)   # overrides before or after the flags


def summary_line(metrics: dict) -> dict:
    """The headline numbers printed at the end of a run."""
    keep = ("accuracy", "auroc", "f1", "mae", "r2", "mean_dice", "severity_mae", "loss")
    out = {"task": metrics["task"], "best_step": metrics["best_step"]}
    for split in ("val", "test"):
        m = metrics.get(split) or {}
        out[split] = {k: round(m[k], 4) for k in keep if isinstance(m.get(k), float)}
    return out


def cli(argv) -> int:
    a = parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        metrics = run(cfg, resume=a.resume, progress=not a.no_progress)
    except LockedError as e:     # exit 2: usage error, nothing ran
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, FileNotFoundError, CheckpointError, NonFiniteLoss) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(summary_line(metrics)))
    print(f"model: {Path(cfg['run']['out']) / 'model'}; metrics: {Path(cfg['run']['out']) / 'metrics.json'}")
    return 0
