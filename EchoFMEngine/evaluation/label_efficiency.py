"""Label efficiency: the same task fine-tuned on 1 %, 5 %, ... 100 % of its training labels and
evaluated on one held-out set -> ``label_efficiency.json`` and one plot (metric vs fraction, log x).

    python -m EchoFMEngine evaluate label-efficiency --config Resources/configs/finetune_view.yaml \\
        --fractions 0.01,0.05,0.1,0.25,0.5,1.0 --out runs/label_eff [key=value ...]

Each fraction trains with ``data.label_fraction`` (seeded, class-stratified subset of the training
split, :func:`training.task_data.stratified_subset`) into ``OUT/fraction_<f>/train`` and is
evaluated by :func:`.evaluate.evaluate` into ``OUT/fraction_<f>/eval``. Resumable: a fraction whose
``result.json`` exists is skipped; a fraction whose training finished is only evaluated; a killed
training continues from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..metrics import higher_is_better
from ..models.checkpoint import CheckpointError
from ..tasks import get_task
from ..training import finetune
from ..training.config import load_config
from .cases import config_data_spec, parse_data_spec
from .evaluate import TASKS, evaluate
from .figures import label_efficiency_figure

DEFAULT_FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
RESERVED = ("data.label_fraction", "run.out")


def parse_fractions(text: str) -> list[float]:
    """'0.01,0.1,1' -> sorted distinct fractions in (0, 1]; a clear error otherwise."""
    try:
        values = sorted({float(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--fractions {text!r}: expected comma-separated numbers such as 0.01,0.1,1.0") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise ValueError(f"--fractions {text!r}: every fraction must lie in (0, 1]")
    return values


def metric_value(metrics: dict, path: str) -> dict:
    """``{"value", "ci95"}`` at a dotted ``path`` of an evaluation's metrics (e.g. 'severe.auroc')."""
    node = metrics
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"metric {path!r} not in the evaluation (has: {sorted(metrics)})")
        node = node[key]
    if isinstance(node, dict) and "value" in node:
        return {"value": node["value"], "ci95": node.get("ci95")}
    if isinstance(node, (int, float)):
        return {"value": float(node), "ci95": None}
    raise ValueError(f"metric {path!r} is not a number")


def default_metric(task: str) -> str:
    """The task's model-selection metric (:mod:`EchoFMEngine.tasks`) as a path into ``evaluate``'s
    metrics: a multi-view (AR) evaluation keeps its classes under ``severe``."""
    t = get_task(task)
    return f"severe.{t.select_metric}" if t.views else t.select_metric


def fraction_dir(out: Path, f: float) -> Path:
    return out / f"fraction_{f:g}"


def _held_out(cfg: dict, data: Optional[str]):
    """The held-out set: ``data`` if given, else the dataset's own held-out set where its layout has
    one (phantoms: ``phantom:<data.n_test or 16>``), else the config dataset's test split."""
    if data:
        return parse_data_spec(data), None
    d = cfg["data"]
    spec = config_data_spec(d)
    if spec.config_data is None:
        return spec, None
    if not d.get("test_split"):
        raise ValueError("the config has no data.test_split: give the held-out set with --data")
    return spec, d["test_split"]


def run(config, fractions: Sequence[float], out, overrides: Sequence[str] = (), data: Optional[str] = None,
        split: str = "test", metric: Optional[str] = None, device: Optional[str] = None, n_boot: int = 1000,
        seed: int = 0, progress: bool = False, log=print) -> dict:
    """Train and evaluate every fraction (skipping those already done); returns and writes
    ``OUT/label_efficiency.json`` and ``OUT/label_efficiency.png``."""
    bad = [o for o in overrides if o.split("=", 1)[0].strip() in RESERVED]
    if bad:
        raise ValueError(f"{bad}: label-efficiency sets data.label_fraction and run.out for each fraction itself")
    cfg0 = load_config(config, list(overrides))
    task = cfg0["task"]
    if task not in TASKS:
        raise ValueError(f"{config}: task {task!r} is not a fine-tuning task {list(TASKS)}")
    metric = metric or default_metric(task)
    spec, cfg_split = _held_out(cfg0, data)
    split = cfg_split or split
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"config": Path(config).name, "overrides": list(overrides), "held_out": spec.describe(split),
                "bootstrap": {"n": n_boot, "seed": seed}}
    rows = []
    for f in fractions:
        folder = fraction_dir(out, f)
        done = folder / "result.json"
        if done.is_file():
            row = json.loads(done.read_text())
            if row.get("settings") != settings:
                raise ValueError(f"{done}: fraction {f:g} was run with other settings {row.get('settings')}; "
                                 f"use another --out (now: {settings})")
            ev = json.loads((folder / "eval" / "metrics.json").read_text())
            row.update(metric=metric, **metric_value(ev["metrics"], metric), status="done before (skipped)")
            log(f"fraction {f:g}: done before, skipped")
            rows.append(row)
            continue
        cfg = load_config(config, [*overrides, f"data.label_fraction={f}", f"run.out={folder / 'train'}"])
        t0 = time.perf_counter()
        model_dir = folder / "train" / "model"
        train_metrics_file = folder / "train" / "metrics.json"
        if (model_dir / "model.safetensors").is_file() and train_metrics_file.is_file():
            trained = json.loads(train_metrics_file.read_text())
            log(f"fraction {f:g}: training done before, evaluating")
        else:
            log(f"fraction {f:g}: training")
            trained = finetune.run(cfg, resume=True, progress=progress)
        train_s = time.perf_counter() - t0
        ev = evaluate(task, model_dir, spec, folder / "eval", split=split,
                      device=device or cfg["run"]["device"], batch_size=int(cfg["run"]["eval_batch_size"]),
                      n_boot=n_boot, seed=seed, log=lambda *a: None)
        row = {"fraction": f, "n_train": trained.get("n_train"), "n_train_available": trained.get("n_train_available"),
               "metric": metric, **metric_value(ev["metrics"], metric), "n_eval": ev["n_cases"],
               "train_seconds": round(train_s, 2), "eval": f"{folder.name}/eval/metrics.json",
               "model": f"{folder.name}/train/model", "settings": settings}
        done.write_text(json.dumps(row, indent=2))
        row["status"] = "run"
        log(f"fraction {f:g}: {metric} {row['value']} (n_train {row['n_train']})")
        rows.append(row)
    higher = higher_is_better(metric)
    runs = [{k: v for k, v in r.items() if k != "settings"} for r in sorted(rows, key=lambda r: r["fraction"])]
    result = {"task": task, **settings, "metric": metric, "higher_is_better": higher, "runs": runs,
              "plot": "label_efficiency.png"}
    valid = [r for r in result["runs"] if r["value"] is not None]
    if valid:
        ci = [r["ci95"] if r.get("ci95") and None not in r["ci95"] else [r["value"]] * 2 for r in valid]
        label_efficiency_figure([r["fraction"] for r in valid], [r["value"] for r in valid],
                                out / "label_efficiency.png", metric, ci95=ci, n_train=[r["n_train"] for r in valid],
                                title=f"Label efficiency: {task}, {result['held_out'].get('kind')} held-out set")
    (out / "label_efficiency.json").write_text(json.dumps(result, indent=2))
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine evaluate label-efficiency",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Fine-tune one task on growing fractions of its labels and evaluate "
                                             "each on the same held-out set: label_efficiency.json + plot.",
                                 epilog="example (a quick look):\n  python -m EchoFMEngine evaluate label-efficiency "
                                        "--config Resources/configs/finetune_view.yaml --fractions 0.25,1 "
                                        "--out runs/le_quick --bootstrap 0 run.steps=5")
    ap.add_argument("--config", required=True, help="a fine-tuning config (Resources/configs/finetune_*.yaml)")
    ap.add_argument("--fractions", default=",".join(f"{f:g}" for f in DEFAULT_FRACTIONS),
                    help="comma-separated label fractions in (0, 1] (default %(default)s)")
    ap.add_argument("--out", required=True, help="output folder (one run per fraction + label_efficiency.json)")
    ap.add_argument("--data", default=None, help="held-out set: phantom:N or NAME:ROOT (default: phantom:<n_test> "
                                                 "for phantom configs, else the config's test split)")
    ap.add_argument("--split", default="test", help="split of --data NAME:ROOT")
    ap.add_argument("--metric", default=None, help="path into the evaluation's metrics, e.g. f1 or severe.auroc")
    ap.add_argument("--device", default=None, help="evaluation device (default: the config's run.device)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--progress", action="store_true", help="show the training progress bars")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (not data.label_fraction / run.out)")
    return ap


def cli(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        result = run(a.config, parse_fractions(a.fractions), a.out, a.overrides, data=a.data, split=a.split,
                     metric=a.metric, device=a.device, n_boot=a.bootstrap, seed=a.seed, progress=a.progress)
    except (KeyError, ValueError, FileNotFoundError, CheckpointError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(a.out), "metric": result["metric"],
                      "values": {f"{r['fraction']:g}": r["value"] for r in result["runs"]}}))
    return 0
