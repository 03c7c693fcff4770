"""`python -m EchoFMEngine evaluate`: a fine-tuned checkpoint on held-out data -> ``metrics.json``
(every metric with a 95 % bootstrap CI), ``predictions.csv`` (one row per case, no identifiers)
and the task's figures. The command line (with ``evaluate label-efficiency``) is :mod:`.command`.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from ..data.labels import AR_SEVERE_FROM
from ..metrics import json_safe
from ..models.checkpoint import CheckpointError
from ..models.task_checkpoint import load_task_model, read_task_description
from ..tasks import TASK_NAMES as TASKS
from ..tasks import REGRESSION, SEGMENTATION, get_task, structures_for
from .cases import DataSpec, batches, parse_data_spec
from .tasks import ClassificationEval, MultiEval, RegressionEval, SegmentationEval


# ------------------------------------------------------------------ checkpoints
def describe_checkpoint(path: Union[str, Path]) -> dict:
    """The checkpoint's description without loading weights (task checkpoints, and segmenters
    of the ``echofm-segmenter-v1`` format brought to the same keys)."""
    return read_task_description(path)


def load_checkpoint(path: Union[str, Path], task: str, device="cpu"):
    """The model of ``path`` for ``task`` (its ``description`` attached), or CheckpointError when
    the checkpoint was trained for another task (naming the file, its task and ``task``)."""
    desc = describe_checkpoint(path)
    if desc.get("task") != task:
        raise CheckpointError(f"{path}: checkpoint is for task {desc.get('task')!r}, but --task is {task!r}")
    return load_task_model(path, task=task).to(device).eval()


def class_names(desc: dict) -> list[str]:
    """Label names in class-index order (a list, or a ``{"0": name}`` mapping as in segmenters)."""
    labels = desc.get("labels") or []
    if isinstance(labels, dict):
        return [labels[k] for k in sorted(labels, key=int)]
    return [str(x) for x in labels]


def model_input(desc: dict) -> tuple[int, int]:
    """(frames, size) the checkpoint expects."""
    inp = desc.get("input") or {}
    try:
        frames, h, w = int(inp["frames"]), int(inp["height"]), int(inp["width"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"checkpoint description has no usable 'input' {{frames, height, width}}: {inp}") from None
    if h != w:
        raise ValueError(f"checkpoint input is {h}x{w}; the data layer prepares square clips")
    return frames, h


# ------------------------------------------------------------------- evaluators
def make_evaluator(task: str, desc: dict):
    """The evaluator for ``task`` and this checkpoint's head: classes (view, AS), value (EF),
    label maps (segment), or for AR the severe-vs-not classes plus the severity score when the
    head predicts one (multi-view head)."""
    head, spec = desc.get("head") or {}, get_task(task)
    if spec.kind == SEGMENTATION:
        return SegmentationEval(structures_for(len(class_names(desc))))
    if spec.kind == REGRESSION:
        return RegressionEval(spec.targets[0], spec.eval_title, spec.unit)
    names = class_names(desc)
    has_severity = "severity" in spec.targets      # AR: a severity score beside (or instead of) the classes
    if has_severity and head.get("kind") == "regressor":
        return RegressionEval("severity", "AR severity", "grade", severe_from=AR_SEVERE_FROM)
    if len(names) < 2:
        raise ValueError(f"checkpoint of task {task!r} names {len(names)} classes; a classifier needs >= 2")
    classes = ClassificationEval(names, title=spec.eval_title)
    if has_severity and head.get("kind") == "multiview":
        severity = RegressionEval("severity", "AR severity", "grade", prefix="severity_", plots=("scatter",))
        return MultiEval({"severe": classes, "severity": severity})
    return classes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def write_predictions(rows: list[dict], path: Path) -> Path:
    """One CSV row per case (per labelled frame for segmentation), in evaluation order."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["case"])
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------ main
def evaluate(task: str, checkpoint, data: str, out, split: str = "test", device: str = "auto",
             batch_size: int = 4, n_boot: int = 1000, seed: int = 0, data_options: Optional[dict] = None,
             workers: int = 0, log=print) -> dict:
    """Evaluate ``checkpoint`` on ``data`` (``phantom:N``, ``NAME:ROOT`` or a DataSpec); writes ``out/metrics.json``,
    ``out/predictions.csv`` and the figures, and returns the metrics.json content."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {list(TASKS)}")
    if batch_size < 1 or n_boot < 0:
        raise ValueError(f"--batch-size must be >= 1 and --bootstrap >= 0, got {batch_size}, {n_boot}")
    t0 = time.perf_counter()
    spec = data if isinstance(data, DataSpec) else parse_data_spec(data, data_options)
    dev = resolve_device(device)
    model = load_checkpoint(checkpoint, task, dev)
    desc = model.description
    frames, size = model_input(desc)
    evaluator = make_evaluator(task, desc)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    it, skipped, n_total = batches(spec, task, split, frames, size, batch_size, class_names(desc), workers)
    done = 0
    for chunk in it:
        evaluator.add(model, chunk, dev)
        done += len(chunk)
        log(f"PROGRESS {done}/{n_total} cases")
    if done == 0:
        raise ValueError(f"--data {spec.describe(split)}: no readable case ({len(skipped)} skipped)")
    metrics, figs, rows = evaluator.finish(out, n_boot, seed)
    write_predictions(rows, out / "predictions.csv")
    result = {
        "task": task, "checkpoint": "/".join(Path(checkpoint).resolve().parts[-2:]),
        "trained_on": desc.get("trained_on"),
        "data": spec.describe(split), "n_cases": done, "skipped": skipped,
        "class_names": class_names(desc), "metrics": metrics,
        "bootstrap": {"n": n_boot, "seed": seed, "ci": 0.95, "method": "percentile, resampling cases"},
        "figures": figs, "predictions": "predictions.csv", "device": str(dev),
        "input": {"frames": frames, "size": size}, "seconds": round(time.perf_counter() - t0, 2),
    }
    result = json_safe(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _key_values(pairs: list[str]) -> dict:
    """``key=value`` strings -> dict (values read as YAML: numbers, booleans, lists)."""
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise ValueError(f"--data-option {p!r}: expected key=value")
        out[k] = yaml.safe_load(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m EchoFMEngine evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python -m EchoFMEngine evaluate --task TASK --checkpoint CKPT --data DATA --out DIR [options]\n"
              "       python -m EchoFMEngine evaluate label-efficiency --config FILE --out DIR [options]",
        description="Evaluate a fine-tuned checkpoint: metrics.json with 95 % bootstrap CIs, predictions.csv "
                    "and figures.\n\ncommands:\n  label-efficiency  fine-tune on growing label fractions and "
                    "evaluate each (`evaluate label-efficiency --help`)",
        epilog="example (after `python train.py --config Resources/configs/finetune_view.yaml run.out=runs/view`):\n"
               "  python -m EchoFMEngine evaluate --task view --checkpoint runs/view/model --data phantom:16 "
               "--out runs/view/eval")
    ap.add_argument("--task", required=True, choices=TASKS, help="the checkpoint's task")
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder (model.safetensors + config.json) or file")
    ap.add_argument("--data", required=True, help="phantom:N, or NAME:ROOT with NAME a registry dataset (camus, ...)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--split", default="test", help="split of --data NAME:ROOT to evaluate (default test)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--batch-size", type=int, default=4, help="clips per forward pass (default 4)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--workers", type=int, default=0, help="data-loading processes for datasets")
    ap.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra build_dataset option, e.g. task=as_presence (TMED-2) or csv_file=labels.csv")
    return ap


def cli(argv: list[str]) -> int:
    """``evaluate --task ...`` (``evaluate label-efficiency`` is dispatched by :mod:`.command`)."""
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args.task, args.checkpoint, args.data, args.out, split=args.split, device=args.device,
                          batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed,
                          data_options=_key_values(args.data_option), workers=args.workers)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for s in result["skipped"]:
        print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
    print(json.dumps({"out": str(args.out), "n_cases": result["n_cases"], "skipped": len(result["skipped"]),
                      "headline": headline(result)}))
    return 0


def headline(result: dict) -> dict:
    """The task's main numbers (value and CI) for logs and the label-efficiency table."""
    m = result["metrics"]
    if "severe" in m:                    # AR multi-view: classes and severity score
        out = {k: m["severe"][k] for k in ("auroc", "accuracy") if k in m["severe"]}  # AUROC: both classes needed
        if "mae" in m["severity"]:
            out["severity_mae"] = m["severity"]["mae"]
        return out
    keys = {"segment": ["mean_dice"], "ef": ["mae", "rmse", "r2"]}.get(result["task"])
    if keys is None:
        keys = ["accuracy", "f1", "auroc"] if "accuracy" in m else ["mae", "auroc_severe"]
    return {k: m[k] for k in keys if k in m}
