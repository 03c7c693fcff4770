"""Task heads on the EchoFM encoder: UNETR-style segmentation (video and per-frame), classification,
regression and multi-view fusion, all sharing one frozen-or-trainable encoder wrapper.

Data flow of :class:`EchoFMSegmenter`::

    video [B,3,T,H,W] -> encoder (all tokens) -> final tokens + raw outputs of a few blocks
      -> each: [B,D,t,s,s] -> ConvTranspose3d over time (x tubelet) -> per-frame maps [B*T,w,s,s]
      -> UNETR decoder per frame: start at the final tokens (s x s), upsample x2 per stage,
         merging a deeper-to-shallower block output (itself upsampled to that size) at each stage
         and a small conv stem on the frame pixels at full size -> logits [B,C,T,H,W]

The decoder is 2D per frame (the encoder already mixes time), so training can decode only the
labelled frames (``frames=`` mask): labels exist at ED and ES only, and decoding 2-3 frames of a
32-frame clip is an order of magnitude cheaper than all of them.

Pooled heads (:class:`EchoFMClassifier`, :class:`EchoFMRegressor`, :class:`EchoFMMultiView`) mean-pool
the final encoder tokens, as in the paper (mean-pooled tokens -> one linear layer). Every model
here has ``head_config()`` (what :mod:`EchoFMEngine.models.task_checkpoint` stores) and is rebuilt
by :func:`build_task_head` from that dict.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..tasks import HEAD_DEFAULTS, get_task
from .echofm import EchoFM


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convs with GroupNorm + GELU (UNETR's residual-free basic block)."""
    def unit(a, b):
        return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.GroupNorm(min(8, b), b), nn.GELU()]
    return nn.Sequential(*unit(cin, cout), *unit(cout, cout))


def up2(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)


def default_layers(depth: int, n_stages: int) -> list[int]:
    """``n_stages - 1`` evenly spaced block indices (0-based), e.g. depth 24, 4 stages -> 5, 11, 17
    (UNETR's z3/z6/z9 at ViT-B depth 12 scaled); the final block enters through the final norm."""
    return [max(0, round(depth * k / n_stages) - 1) for k in range(1, n_stages)]


class SegmentationHead(nn.Module):
    """UNETR-style decoder: token maps of ``len(layers)`` blocks + final -> per-frame logits.

    ``width`` is the channel count at full resolution; it doubles at every coarser stage
    (capped at 256). The number of x2 stages is ``log2(patch_size)`` (patch must be a power of 2).
    """

    def __init__(self, cfg, n_classes: int = 4, layers: Optional[Sequence[int]] = None, width: int = 16):
        super().__init__()
        p = cfg.patch_size
        n_up = int(round(math.log2(p)))
        if 2 ** n_up != p or n_up < 1:
            raise ValueError(f"SegmentationHead needs a power-of-2 patch size, got {p}")
        self.layers = list(default_layers(cfg.depth, n_up) if layers is None else layers)
        if len(self.layers) != n_up - 1:
            raise ValueError(f"need {n_up - 1} intermediate layers for patch {p}, got {self.layers}")
        if any(not 0 <= i < cfg.depth for i in self.layers):
            raise ValueError(f"layers must lie in [0, {cfg.depth}), got {self.layers}")
        self.cfg, self.n_classes, self.n_up, self.width = cfg, n_classes, n_up, width
        d, tub = cfg.embed_dim, cfg.tubelet
        w = [min(256, width * 2 ** (n_up - k)) for k in range(n_up + 1)]   # w[0] coarsest .. w[n_up] full
        time_up = dict(kernel_size=(tub, 1, 1), stride=(tub, 1, 1))

        self.norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-6) for _ in self.layers)
        self.bottom = nn.ConvTranspose3d(d, w[0], **time_up)               # final tokens, per frame
        # Skip from the deepest listed block joins at stage 1 (s*2), the shallowest at stage n_up-1.
        self.skip_time = nn.ModuleList(nn.ConvTranspose3d(d, w[k], **time_up) for k in range(1, n_up))
        self.skip_up = nn.ModuleList(nn.Sequential(*[up2(w[k], w[k]) for _ in range(k)]) for k in range(1, n_up))
        self.stem = conv_block(cfg.in_chans, w[n_up])                      # pixels, full resolution
        self.up = nn.ModuleList(up2(w[k - 1], w[k]) for k in range(1, n_up + 1))
        self.fuse = nn.ModuleList(conv_block(2 * w[k], w[k]) for k in range(1, n_up + 1))
        self.out = nn.Conv2d(w[n_up], n_classes, 1)

    def _frames(self, tokens: torch.Tensor, time_up: nn.Module, sel: Optional[torch.Tensor]) -> torch.Tensor:
        """Tokens ``[B,N,D]`` -> per-frame maps ``[B*T or K, w, s, s]``."""
        c = self.cfg
        x = rearrange(tokens, "b (t h w) d -> b d t h w", t=c.t_grid, h=c.s_grid, w=c.s_grid)
        x = rearrange(time_up(x), "b c t h w -> b t c h w")
        return x[sel] if sel is not None else x.flatten(0, 1)

    def forward(self, video: torch.Tensor, final: torch.Tensor, hidden: Sequence[torch.Tensor],
                frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``video [B,3,T,H,W]``, ``final`` normed tokens ``[B,N,D]``, ``hidden`` raw outputs of
        ``self.layers`` -> logits ``[B,C,T,H,W]``, or ``[K,C,H,W]`` for the ``K`` True entries of a
        bool ``frames [B,T]`` (row-major order)."""
        b, _, t, h, w = video.shape
        hidden = [norm(x) for norm, x in zip(self.norms, hidden)]
        y = self._frames(final, self.bottom, frames)
        pixels = rearrange(video, "b c t h w -> b t c h w")
        pixels = pixels[frames] if frames is not None else pixels.flatten(0, 1)
        skips = [up(self._frames(x, tu, frames)) for x, tu, up in
                 zip(reversed(hidden), self.skip_time, self.skip_up)] + [self.stem(pixels)]
        for up, fuse, skip in zip(self.up, self.fuse, skips):
            y = fuse(torch.cat([up(y), skip], dim=1))
        y = self.out(y)
        if frames is not None:
            return y
        return rearrange(y, "(b t) c h w -> b c t h w", b=b, t=t)


class EncoderModel(nn.Module):
    """An EchoFM encoder that a task head sits on, trainable or frozen.

    ``freeze_encoder=True`` (the paper's setting for classification): encoder parameters get
    ``requires_grad=False``, the encoder stays in eval mode whatever ``train()`` is called with,
    and it runs without autograd, so its weights cannot change. The encoder's MAE decoder and
    projector are kept (unused) so any EchoFM can be wrapped.
    """

    kind = "base"

    def __init__(self, encoder: EchoFM, freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self.set_frozen(freeze_encoder)

    @property
    def cfg(self):
        return self.encoder.cfg

    def set_frozen(self, frozen: bool) -> "EncoderModel":
        """Freeze (or unfreeze) the encoder; unused MAE parts stay untrainable either way."""
        self.freeze_encoder = bool(frozen)
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(not self.freeze_encoder and not name.startswith(ENCODER_UNUSED))
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def encoder_context(self):
        """No autograd through a frozen encoder."""
        return torch.no_grad() if self.freeze_encoder else contextlib.nullcontext()

    def features(self, video: torch.Tensor, layers: Sequence[int] = ()) -> tuple[torch.Tensor, list]:
        """Final normed tokens ``[B,N,D]`` and the raw outputs of blocks ``layers`` (no masking)."""
        ids = self.encoder.ids_keep(video.shape[0], 0.0, device=video.device)
        with self.encoder_context():
            return self.encoder.forward_encoder(video, ids, return_layers=layers)

    def pooled(self, video: torch.Tensor) -> torch.Tensor:
        """Mean of the final encoder tokens ``[B, D]`` (checks the video against the encoder first)."""
        self.encoder.check_video(video, finite=not self.training)
        return self.features(video)[0].mean(1)


ENCODER_UNUSED = ("projector", "decoder", "mask_token")   # EchoFM parts a task model never runs


class EchoFMSegmenter(EncoderModel):
    """EchoFM encoder + :class:`SegmentationHead`: ``forward(video) -> logits [B,C,T,H,W]``."""

    kind = "segmenter"

    def __init__(self, encoder: EchoFM, n_classes: int = 4, layers: Optional[Sequence[int]] = None,
                 freeze_encoder: bool = False, width: int = 16):
        super().__init__(encoder, freeze_encoder)
        self.head = SegmentationHead(encoder.cfg, n_classes, layers, width)

    def head_config(self) -> dict:
        return {"kind": self.kind, "n_classes": self.head.n_classes, "layers": list(self.head.layers),
                "width": self.head.width}

    def features(self, video: torch.Tensor, layers: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, list]:
        """Final normed tokens and the raw outputs of the head's layers (no masking)."""
        return super().features(video, self.head.layers if layers is None else layers)

    def forward(self, video: torch.Tensor, frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B,C,T,H,W]``; with a bool ``frames [B,T]`` only those frames, ``[K,C,H,W]``."""
        self.encoder.check_video(video, finite=not self.training)
        final, hidden = self.features(video)
        return self.head(video, final, hidden, frames)

    @torch.no_grad()
    def predict(self, video: torch.Tensor) -> torch.Tensor:
        """Label maps ``[B,T,H,W]`` (argmax over classes)."""
        return self.forward(video).argmax(1)


def to_frame_encoder(encoder: EchoFM) -> EchoFM:
    """A single-frame copy of a video encoder (``num_frames = tubelet = 1``) for 2D segmentation.

    The tubelet kernel is summed over its frames, which is exactly what the video encoder computes
    for one frame replicated across a tubelet, and the temporal position table is averaged; all
    other tensors are copied (the unused MAE decoder keeps what fits)."""
    cfg = encoder.cfg
    if cfg.num_frames == 1 and cfg.tubelet == 1:
        return _copy_encoder(encoder)
    frame_cfg = cfg.with_overrides(num_frames=1, tubelet=1, pred_t_dim=None)
    out = EchoFM(frame_cfg)
    target = out.state_dict()
    for key, value in encoder.state_dict().items():
        if key == "patch_embed.proj.weight":
            value = value.sum(dim=2, keepdim=True)
        elif key.endswith("pos_embed_temporal"):
            value = value.mean(dim=1, keepdim=True)
        if key in target and target[key].shape == value.shape:
            target[key] = value.detach().clone()
    out.load_state_dict(target)
    return out


def _copy_encoder(encoder: EchoFM) -> EchoFM:
    out = EchoFM(encoder.cfg)
    out.load_state_dict(encoder.state_dict())
    return out


class EchoFMFrameSegmenter(EchoFMSegmenter):
    """The 2D variant: each frame is segmented on its own by a single-frame encoder
    (:func:`to_frame_encoder`) and the same UNETR head. Takes clips of any length ``[B,3,T,H,W]``;
    with ``frames`` only the selected frames are encoded at all (training on ED/ES)."""

    kind = "frame_segmenter"

    def __init__(self, encoder: EchoFM, n_classes: int = 4, layers: Optional[Sequence[int]] = None,
                 freeze_encoder: bool = False, width: int = 16, chunk: int = 64):
        if (encoder.cfg.num_frames, encoder.cfg.tubelet) != (1, 1):
            raise ValueError(f"EchoFMFrameSegmenter needs a single-frame encoder (num_frames = tubelet = 1), got "
                             f"{encoder.cfg.num_frames} frames / tubelet {encoder.cfg.tubelet}; use to_frame_encoder()")
        super().__init__(encoder, n_classes, layers, freeze_encoder, width)
        self.chunk = int(chunk)

    def forward(self, video: torch.Tensor, frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B,C,T,H,W]``; with a bool ``frames [B,T]`` only those frames, ``[K,C,H,W]``."""
        if not isinstance(video, torch.Tensor) or video.ndim != 5:
            raise ValueError(f"video must be [B, C, T, H, W], got {getattr(video, 'shape', type(video))}")
        b, _, t = video.shape[:3]
        x = rearrange(video, "b c t h w -> b t c h w")
        x = x[frames] if frames is not None else x.flatten(0, 1)
        x = x.unsqueeze(2)                                           # [K, C, 1, H, W]
        parts = [super(EchoFMFrameSegmenter, self).forward(x[i:i + self.chunk])[:, :, 0]
                 for i in range(0, len(x), self.chunk)]
        y = torch.cat(parts) if parts else x.new_zeros((0, self.head.n_classes, *video.shape[-2:]))
        if frames is not None:
            return y
        return rearrange(y, "(b t) c h w -> b c t h w", b=b, t=t)


class PooledHead(nn.Module):
    """Mean-pooled tokens -> (LayerNorm) -> dropout -> one linear layer."""

    def __init__(self, dim: int, n_out: int, norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, n_out)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        self.n_out, self.has_norm, self.dropout = n_out, bool(norm), float(dropout)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(pooled)))


class EchoFMClassifier(EncoderModel):
    """Clip classifier (view, AS): ``forward(video) -> logits [B,C]``, ``predict_proba -> [B,C]``."""

    kind = "classifier"

    def __init__(self, encoder: EchoFM, n_classes: int, freeze_encoder: bool = False, norm: bool = True,
                 dropout: float = 0.0):
        super().__init__(encoder, freeze_encoder)
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.head = PooledHead(encoder.cfg.embed_dim, n_classes, norm, dropout)

    @property
    def n_classes(self) -> int:
        return self.head.n_out

    def head_config(self) -> dict:
        return {"kind": self.kind, "n_classes": self.n_classes, "norm": self.head.has_norm,
                "dropout": self.head.dropout}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(video))

    @torch.no_grad()
    def predict_proba(self, video: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C]`` (softmax)."""
        return self.forward(video).float().softmax(-1)


class EchoFMRegressor(EncoderModel):
    """Clip regressor (EF): the head predicts a standardised value; ``predict(video) -> [B]`` in
    the target's units (``target_mean + target_std * output``, both stored with the weights)."""

    kind = "regressor"

    def __init__(self, encoder: EchoFM, freeze_encoder: bool = False, norm: bool = True, dropout: float = 0.0,
                 target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__(encoder, freeze_encoder)
        if not target_std > 0:
            raise ValueError(f"target_std must be > 0, got {target_std}")
        self.head = PooledHead(encoder.cfg.embed_dim, 1, norm, dropout)
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def head_config(self) -> dict:
        return {"kind": self.kind, "norm": self.head.has_norm, "dropout": self.head.dropout,
                "target_mean": float(self.target_mean), "target_std": float(self.target_std)}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Standardised prediction ``[B]`` (what the loss sees)."""
        return self.head(self.pooled(video))[:, 0]

    @torch.no_grad()
    def predict(self, video: torch.Tensor) -> torch.Tensor:
        """Prediction ``[B]`` in the target's units (EF in percent)."""
        return self.forward(video).float() * self.target_std + self.target_mean


class EchoFMMultiView(EncoderModel):
    """One study = several clips in fixed view slots (AR: A3C, A5C, PSAX, PLAX), some absent.

    Each available clip is encoded and mean-pooled, a learned view embedding is added, and the
    views are fused by ``fusion``: 'attention' (softmax over available views of a learned score)
    or 'mean' (masked mean). One linear layer then gives two outputs: a severity score (trained
    on severity / ``severity_max``) and the logit of the binary class (AR: severe >= 2.5).

    ``forward(videos [B,V,3,T,H,W], view_mask [B,V]) -> [B,2]``; ``predict_proba -> [B,2]``
    (not severe, severe); ``predict -> [B]`` severity in grade units, clipped to [0, severity_max].
    """

    kind = "multiview"

    def __init__(self, encoder: EchoFM, views: Sequence[str] = ("A3C", "A5C", "PSAX", "PLAX"),
                 fusion: str = "attention", freeze_encoder: bool = False, norm: bool = True, dropout: float = 0.0,
                 severity_max: float = 4.0):
        super().__init__(encoder, freeze_encoder)
        if fusion not in ("attention", "mean"):
            raise ValueError(f"fusion must be 'attention' or 'mean', got {fusion!r}")
        self.views, self.fusion, self.severity_max = list(views), fusion, float(severity_max)
        d = encoder.cfg.embed_dim
        self.view_embed = nn.Parameter(torch.zeros(len(self.views), d))
        nn.init.trunc_normal_(self.view_embed, std=0.02)
        self.score_norm = nn.LayerNorm(d, eps=1e-6)
        self.score = nn.Linear(d, 1)
        nn.init.zeros_(self.score.weight)             # attention starts as the masked mean
        nn.init.zeros_(self.score.bias)
        self.head = PooledHead(d, 2, norm, dropout)

    def head_config(self) -> dict:
        return {"kind": self.kind, "views": self.views, "fusion": self.fusion, "norm": self.head.has_norm,
                "dropout": self.head.dropout, "severity_max": self.severity_max}

    def _check(self, videos: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        v = len(self.views)
        if not isinstance(videos, torch.Tensor) or videos.ndim != 6 or videos.shape[1] != v:
            raise ValueError(f"videos must be [B, {v}, C, T, H, W] (views {self.views}), got "
                             f"{tuple(getattr(videos, 'shape', ()))}")
        mask = torch.as_tensor(view_mask, device=videos.device).bool()
        if mask.shape != videos.shape[:2]:
            raise ValueError(f"view_mask must be [B, {v}] like videos, got {tuple(mask.shape)}")
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"studies {empty} of the batch have no available view (view_mask all False)")
        return mask

    def fusion_weights(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weights ``[B,V]`` of each view in the fused study vector (0 for absent views)."""
        if self.fusion == "mean":
            w = mask.float()
            return w / w.sum(1, keepdim=True)
        scores = self.score(self.score_norm(feats))[..., 0].float().masked_fill(~mask, float("-inf"))
        return scores.softmax(1)

    def fuse(self, videos: torch.Tensor, view_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(study vectors ``[B,D]``, fusion weights ``[B,V]``); only available views are encoded."""
        mask = self._check(videos, view_mask)
        pooled = self.pooled(videos[mask])                                   # [K, D]
        feats = pooled.new_zeros((*mask.shape, pooled.shape[-1]))
        feats[mask] = pooled
        feats = feats + self.view_embed.to(feats.dtype)
        w = self.fusion_weights(feats, mask)
        return (w.unsqueeze(-1).to(feats.dtype) * feats).sum(1), w

    def forward(self, videos: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """``[B,2]``: severity / severity_max (regression), logit of the positive class."""
        return self.head(self.fuse(videos, view_mask)[0])

    @torch.no_grad()
    def predict_proba(self, videos: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """``[B,2]`` probabilities (negative, positive class), from the binary output."""
        p = torch.sigmoid(self.forward(videos, view_mask)[:, 1].float())
        return torch.stack([1 - p, p], dim=1)

    @torch.no_grad()
    def predict(self, videos: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """Severity ``[B]`` in grade units (AR: 0-4), from the regression output."""
        return (self.forward(videos, view_mask)[:, 0].float() * self.severity_max).clamp(0, self.severity_max)


MODEL_KINDS = {cls.kind: cls for cls in (EchoFMSegmenter, EchoFMFrameSegmenter, EchoFMClassifier, EchoFMRegressor,
                                         EchoFMMultiView)}


def new_head_config(task: str, n_labels: int, options: Optional[dict] = None,
                    target_stats: Optional[dict] = None) -> dict:
    """The ``head_config()`` dict of a new, untrained model for ``task`` (:mod:`EchoFMEngine.tasks`)
    with ``n_labels`` output names, from a config's ``head`` ``options`` (norm, dropout, width,
    layers, fusion, frame_model) and, for a regressor, the training targets' ``mean`` / ``std``."""
    spec = get_task(task)
    o = dict(HEAD_DEFAULTS, **(options or {}))
    kind = spec.head_kind(o)
    pooled = {"norm": o["norm"], "dropout": o["dropout"]}
    if kind in ("segmenter", "frame_segmenter"):
        return {"kind": kind, "n_classes": n_labels, "layers": o["layers"], "width": o["width"]}
    if kind == "classifier":
        return {"kind": kind, "n_classes": n_labels, **pooled}
    if kind == "regressor":
        stats = target_stats or {"mean": 0.0, "std": 1.0}
        return {"kind": kind, **pooled, "target_mean": stats["mean"], "target_std": stats["std"]}
    if kind == "multiview":
        return {"kind": kind, "views": list(spec.views), "fusion": o["fusion"], **pooled}
    raise ValueError(f"task {task!r}: no rule for a new {kind!r} head")


def build_new_task_model(encoder: EchoFM, task: str, n_labels: int, options: Optional[dict] = None,
                         freeze_encoder: bool = False, target_stats: Optional[dict] = None) -> EncoderModel:
    """A new model for ``task`` on ``encoder`` (a per-frame segmenter gets a single-frame copy of it)."""
    head = new_head_config(task, n_labels, options, target_stats)
    if head["kind"] == "frame_segmenter":
        encoder = to_frame_encoder(encoder)
    return build_task_head(encoder, head, freeze_encoder=freeze_encoder)


def build_task_head(encoder: EchoFM, head: dict, freeze_encoder: bool = False) -> EncoderModel:
    """The task model that ``head`` (a ``head_config()`` dict) describes, on ``encoder``."""
    args = dict(head)
    kind = args.pop("kind", None)
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](encoder, freeze_encoder=freeze_encoder, **args)
