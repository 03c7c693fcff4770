"""Loading the released EchoFM weights, and the project's own safetensors + JSON format.

Released files are torch pickles laid out as in ../shared/spec/echofm-model.md: separate
``q``/``k``/``v`` projections (fused here into timm's ``qkv``), the projector stored as
``decoder_block`` / ``decoder_prj_cls_token`` / ``prj_norm`` (older files reuse ``norm``).
Only tensors are read (``weights_only=True``): a file that needs code execution is refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import PRESETS, EchoFMConfig, make_config
from .echofm import EchoFM
from .files import CheckpointError, weights_file   # their torch-free home; still importable from here

log = logging.getLogger(__name__)
FORMAT = "echofm-safetensors-v1"


# released name -> our name (prefix renames; q/k/v fusion is handled separately)
_RENAMES = (
    ("decoder_block.", "projector."),
    ("decoder_prj_cls_token", "projector_cls_token"),
    ("prj_norm.", "projector_norm."),
)
_QKV = re.compile(r"^(.*\.attn)\.([qkv])\.(weight|bias)$")


def _unwrap(obj, path) -> tuple[dict, dict]:
    """(state_dict, model_args) from the file layouts we accept."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    args = {}
    for key in ("model_args", "args"):
        a = obj.get(key)
        if isinstance(a, argparse.Namespace):
            a = vars(a)
        if isinstance(a, dict):
            args = {**a, **args}
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors found (keys: {sorted(obj)[:8]})")
    return sd, args


def convert_official_state_dict(sd: dict) -> tuple[dict, list]:
    """Rename released keys to ours and fuse q/k/v; returns (state_dict, notes)."""
    out, qkv, notes = {}, {}, []
    for key, value in sd.items():
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{prefix}.{{q,k,v}}.{kind}: only {sorted(parts)} present")
        out[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if "projector_norm.weight" not in out and "norm.weight" in out:
        out["projector_norm.weight"] = out["norm.weight"].clone()
        out["projector_norm.bias"] = out["norm.bias"].clone()
        notes.append("file has no prj_norm: projector uses a copy of the encoder's final norm (older layout)")
    return out, notes


def _count_blocks(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict, args: Optional[dict] = None, path="checkpoint") -> EchoFMConfig:
    """Model sizes from tensor shapes (ours, after conversion); heads from ``args`` or a preset."""
    args = dict(args or {})
    try:
        w = sd["patch_embed.proj.weight"]                     # [D, C, t, p, p]
        d, chans, t, p = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
        n_spatial = sd["pos_embed_spatial"].shape[1]
        t_grid = sd["pos_embed_temporal"].shape[1]
        dd = sd["decoder_embed.weight"].shape[0]
        mlp = sd["blocks.0.mlp.fc1.weight"].shape[0] / d
    except KeyError as e:
        if "pos_embed" in sd:
            raise CheckpointError(f"{path}: joint (non-separable) position embeddings are not supported")
        raise CheckpointError(f"{path}: missing key {e.args[0]!r} needed to infer the model size")
    side = int(round(n_spatial ** 0.5))
    if side * side != n_spatial:
        raise CheckpointError(f"{path}: pos_embed_spatial has {n_spatial} positions, not a square grid")
    preset_heads = {PRESETS[n]["embed_dim"]: PRESETS[n]["num_heads"] for n in ("vit_s", "vit_b", "vit_l")}
    heads = args.get("num_heads") or preset_heads.get(d) or max(1, d // 64)
    num_frames = args.get("num_frames") or t_grid * t
    pred_t = args.get("pred_t_dim")
    if pred_t is None:
        per_token = sd["decoder_pred.weight"].shape[0] // (p * p * chans)
        pred_t = per_token * num_frames // t
    return make_config(
        "vit_l", img_size=side * p, num_frames=num_frames, tubelet=t, patch_size=p, in_chans=chans,
        embed_dim=d, depth=_count_blocks(sd, "blocks."), num_heads=heads, mlp_ratio=mlp,
        decoder_embed_dim=dd, decoder_depth=_count_blocks(sd, "decoder_blocks."),
        decoder_num_heads=args.get("decoder_num_heads") or 16, pred_t_dim=pred_t,
        norm_pix_loss=bool(args.get("norm_pix_loss", False)),
    )


def load_state_dict_checked(model: EchoFM, sd: dict, path="checkpoint", strict: bool = False) -> dict:
    """Load ``sd`` into ``model``: shape mismatches raise naming the first key and both shapes;
    missing and unexpected keys are returned (and logged), and raise when ``strict``."""
    own = model.state_dict()
    for key, value in sd.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)} in the file but {tuple(own[key].shape)} in the model"
            )
    result = model.load_state_dict(sd, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if report["missing"] or report["unexpected"]:
        msg = f"{path}: missing keys {report['missing'][:10]}, unexpected keys {report['unexpected'][:10]}"
        if strict:
            raise CheckpointError(msg)
        log.warning(msg)
    return report


def _torch_load(path: Path, map_location) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file needs code execution to load (only tensors are read): {e}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from None


def load_official_checkpoint(path: Union[str, Path], map_location="cpu", strict: bool = False) -> EchoFM:
    """An EchoFM from a released checkpoint (``{"model", "model_args"}``, training or bare state dict).

    The load report (missing / unexpected keys, layout notes) is kept in ``model.load_report``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    sd, args = _unwrap(_torch_load(path, map_location), path)
    sd, notes = convert_official_state_dict(sd)
    model = EchoFM(infer_config(sd, args, path))
    report = load_state_dict_checked(model, sd, path, strict)
    report["notes"] = notes
    for note in notes:
        log.info("%s: %s", path, note)
    model.load_report = report
    return model


# ------------------------------------------------------- VideoMAE-style
def is_videomae_state_dict(sd: dict) -> bool:
    """VideoMAE files keep the encoder under ``encoder.`` and attention biases as q_bias/v_bias."""
    return any(k.startswith("encoder.blocks.") or k.endswith(".attn.q_bias") for k in sd)


def convert_videomae_state_dict(sd: dict, cfg: EchoFMConfig) -> tuple[dict, list]:
    """Encoder weights of a VideoMAE(-style) checkpoint in our names; returns (state_dict, notes).

    q/k/v biases come as ``q_bias``/``v_bias`` (k has none: zeros); VideoMAE's decoder has other
    widths and its position table is a fixed sinusoid over all tokens, so both stay at our init;
    a shorter tubelet is inflated in time (weights repeated and divided, so a static clip gives
    the same embedding)."""
    out, notes = {}, []
    for key, value in sd.items():
        key = key.removeprefix("module.").removeprefix("encoder.")
        if key.startswith(("decoder", "encoder_to_decoder", "mask_token", "head", "fc_norm", "pos_embed")):
            continue
        if key.endswith(".attn.q_bias"):
            prefix = key[: -len("q_bias")]
            v = sd.get("encoder." + prefix + "v_bias", sd.get(prefix + "v_bias"))
            out[prefix + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v])
        elif not key.endswith(".attn.v_bias"):
            out[key] = value
    w = out.get("patch_embed.proj.weight")
    if w is not None and w.shape[2] != cfg.tubelet and cfg.tubelet % w.shape[2] == 0:
        k = cfg.tubelet // w.shape[2]
        out["patch_embed.proj.weight"] = w.repeat_interleave(k, dim=2) / k
        notes.append(f"tubelet {w.shape[2]} inflated to {cfg.tubelet} frames")
    notes.append("position embeddings, projector and decoder keep their initialisation (not in the file's layout)")
    return out, notes


def init_from_checkpoint(model: EchoFM, path: Union[str, Path]) -> dict:
    """Initialise ``model`` from any supported file (ours, released EchoFM, VideoMAE-style);
    tensors that fit are copied, a shape that does not fit raises. Returns the load report."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        sd, notes = load_pretrained(path, strict=False).state_dict(), []
    else:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        raw, _ = _unwrap(_torch_load(path, "cpu"), path)
        if is_videomae_state_dict(raw):
            sd, notes = convert_videomae_state_dict(raw, model.cfg)
        else:
            sd, notes = convert_official_state_dict(raw)
    report = load_state_dict_checked(model, sd, path, strict=False)
    report["notes"] = notes
    return report


# ----------------------------------------------------------- own format
def save_pretrained(model: EchoFM, path: Union[str, Path], metadata: Optional[dict] = None) -> Path:
    """Write ``model.safetensors`` (config inside its metadata) and ``config.json`` into folder ``path``.

    ``metadata`` (JSON-serialisable) is stored too: fine-tuned checkpoints describe their task there.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(model.cfg.to_dict())}
    if metadata:
        meta["metadata"] = json.dumps(metadata)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"format": FORMAT, "config": model.cfg.to_dict(),
                                                 "metadata": metadata or {}}, indent=2))
    return out


def read_pretrained_header(path: Union[str, Path]) -> tuple[EchoFMConfig, dict]:
    """(config, metadata) of a saved model without reading its tensors."""
    file = weights_file(path)
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an EchoFM safetensors file (format={meta.get('format')!r})")
    return EchoFMConfig.from_dict(json.loads(meta["config"])), json.loads(meta.get("metadata", "{}"))


def load_pretrained(path: Union[str, Path], map_location="cpu", strict: bool = True) -> EchoFM:
    """Load a model written by :func:`save_pretrained` (folder or ``.safetensors`` file)."""
    file = weights_file(path)
    cfg, meta = read_pretrained_header(file)
    model = EchoFM(cfg)
    sd = {}
    with safe_open(str(file), framework="pt", device=str(map_location)) as f:
        for key in f.keys():
            sd[key] = f.get_tensor(key)
    load_state_dict_checked(model, sd, file, strict)
    model.metadata = meta
    return model


def cli(argv) -> int:
    """`python -m EchoFMEngine info FILE`: describe a checkpoint (ours or a released one)."""
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine info", description=cli.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example (after `python train.py`):\n"
                                        "  python -m EchoFMEngine info runs/demo/pretrain/model")
    ap.add_argument("path", help="our model folder or .safetensors file, or a released EchoFM .pth checkpoint")
    a = ap.parse_args(argv)
    try:
        if str(a.path).endswith(".safetensors") or Path(a.path).is_dir():
            cfg, meta = read_pretrained_header(a.path)
            report = {"format": FORMAT}
        else:
            model = load_official_checkpoint(a.path)
            cfg, meta, report = model.cfg, {}, model.load_report
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    print(json.dumps({"config": cfg.to_dict(), "metadata": meta, "report": report}, indent=2))
    return 0
