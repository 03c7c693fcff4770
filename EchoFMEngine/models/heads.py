"""Dense heads on the EchoFM encoder: a small UNETR-style segmentation decoder.

Data flow of :class:`EchoFMSegmenter`::

    video [B,3,T,H,W] -> encoder (all tokens) -> final tokens + raw outputs of a few blocks
      -> each: [B,D,t,s,s] -> ConvTranspose3d over time (x tubelet) -> per-frame maps [B*T,w,s,s]
      -> UNETR decoder per frame: start at the final tokens (s x s), upsample x2 per stage,
         merging a deeper-to-shallower block output (itself upsampled to that size) at each stage
         and a small conv stem on the frame pixels at full size -> logits [B,C,T,H,W]

The decoder is 2D per frame (the encoder already mixes time), so training can decode only the
labelled frames (``frames=`` mask): labels exist at ED and ES only, and decoding 2-3 frames of a
32-frame clip is an order of magnitude cheaper than all of them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from einops import rearrange

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


class EchoFMSegmenter(nn.Module):
    """EchoFM encoder + :class:`SegmentationHead`: ``forward(video) -> logits [B,C,T,H,W]``.

    ``freeze_encoder=True`` trains the head only: encoder parameters get ``requires_grad=False``,
    the encoder stays in eval mode whatever ``train()`` is called with, and runs without autograd.
    The encoder's MAE decoder and projector are kept (unused) so any EchoFM can be wrapped.
    """

    def __init__(self, encoder: EchoFM, n_classes: int = 4, layers: Optional[Sequence[int]] = None,
                 freeze_encoder: bool = False, width: int = 16):
        super().__init__()
        self.encoder = encoder
        self.head = SegmentationHead(encoder.cfg, n_classes, layers, width)
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @property
    def cfg(self):
        return self.encoder.cfg

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def features(self, video: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Final normed tokens and the raw outputs of the head's layers (no masking)."""
        ids = self.encoder.ids_keep(video.shape[0], 0.0, device=video.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.encoder.forward_encoder(video, ids, return_layers=self.head.layers)

    def forward(self, video: torch.Tensor, frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B,C,T,H,W]``; with a bool ``frames [B,T]`` only those frames, ``[K,C,H,W]``."""
        self.encoder.check_video(video, finite=not self.training)
        final, hidden = self.features(video)
        return self.head(video, final, hidden, frames)

    @torch.no_grad()
    def predict(self, video: torch.Tensor) -> torch.Tensor:
        """Label maps ``[B,T,H,W]`` (argmax over classes)."""
        return self.forward(video).argmax(1)
