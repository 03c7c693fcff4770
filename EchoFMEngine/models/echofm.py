"""EchoFM: a video masked autoencoder with a periodic projector, in one readable file.

Data flow of a pretraining step (``EchoFM.forward``)::

    video [B,3,T,H,W] -> tubelets [B,N,D] (+ separable position embeddings)
      -> keep visible tokens (ids_keep, global indices) -> CLS + ViT blocks -> norm
      -> periodic projector: one CLS per temporal index -> embeddings [B,T/t,D] -> contrastive loss
      -> MAE decoder: scatter visible tokens back to their positions, mask tokens elsewhere
      -> predicted target frames -> masked reconstruction loss

Blocks are timm's (fused qkv, attention through ``scaled_dot_product_attention``).
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import Block

from . import losses
from .config import EchoFMConfig
from .masking import Generators, make_ids_keep, mask_from_ids_keep

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class TubeletEmbed(nn.Module):
    """Non-overlapping ``t x p x p`` tubelets -> tokens ``[B, N, D]`` in time-major order.

    The weights are a ``Conv3d`` (the released layout); since kernel == stride the convolution
    is one matrix product over rearranged tubelets, and with ``ids_keep`` only the visible
    tubelets are embedded (a quarter of the work at mask ratio 0.75).
    """

    def __init__(self, cfg: EchoFMConfig):
        super().__init__()
        self.t, self.p = cfg.tubelet, cfg.patch_size
        k = (cfg.tubelet, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k)

    def forward(self, video: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = rearrange(video, "b c (T t) (h p) (w q) -> b (T h w) (c t p q)", t=self.t, p=self.p, q=self.p)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


def _make_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
    rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=r) for r in rates
    )


def separable_pos_embed(spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
    """Full ``[1, T*L, D]`` table from a spatial ``[1, L, D]`` and a temporal ``[1, T, D]`` table."""
    return (temporal.unsqueeze(2) + spatial.unsqueeze(1)).flatten(1, 2)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b]]`` for every batch element."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class EchoFM(nn.Module):
    """Video ViT encoder + MAE decoder + periodic projector, laid out like the released weights."""

    def __init__(self, cfg: EchoFMConfig):
        super().__init__()
        self.cfg = cfg
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim
        L, T = cfg.num_spatial, cfg.t_grid

        # Encoder
        self.patch_embed = TubeletEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, L, d))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, T, d))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = _make_blocks(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path)
        self.norm = LayerNorm(d)

        # Periodic projector: one shared block, one CLS per temporal index
        self.projector = Block(d, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
        self.projector_cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.projector_norm = LayerNorm(d)

        # MAE decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_spatial = nn.Parameter(torch.zeros(1, L, dd))
        self.decoder_pos_embed_temporal = nn.Parameter(torch.zeros(1, T, dd))
        self.decoder_pos_embed_class = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_blocks = _make_blocks(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio)
        self.decoder_norm = LayerNorm(dd)
        out = cfg.pred_tubelet * cfg.patch_size**2 * cfg.in_chans
        self.decoder_pred = nn.Linear(dd, out)

        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self):
        """MAE-style init: truncated-normal tables, xavier linears and tubelet projection."""
        for p in (self.cls_token, self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class,
                  self.projector_cls_token, self.decoder_cls_token, self.decoder_pos_embed_spatial,
                  self.decoder_pos_embed_temporal, self.decoder_pos_embed_class):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        """Parameter names that AdamW should not decay (tables and tokens; biases/norms by rule)."""
        return {n for n, _ in self.named_parameters() if "token" in n or "pos_embed" in n}

    # ------------------------------------------------------------- checks
    def check_video(self, video: torch.Tensor, finite: bool = True) -> None:
        """Raise a ValueError naming the expected shape when ``video`` does not fit the model.

        ``finite=False`` skips the NaN/Inf check, which needs a host sync (the training loop
        checks its loss instead)."""
        c = self.cfg
        expected = f"[B, {c.in_chans}, {c.num_frames}, {c.img_size}, {c.img_size}]"
        if not isinstance(video, torch.Tensor):
            raise ValueError(f"video must be a torch.Tensor {expected}, got {type(video).__name__}")
        if video.ndim != 5:
            raise ValueError(f"video must have 5 dims {expected}, got shape {tuple(video.shape)}")
        _, ch, t, h, w = video.shape
        if ch != c.in_chans:
            raise ValueError(f"video has {ch} channels, expected {expected}")
        if t != c.num_frames:
            hint = f" (not divisible by tubelet {c.tubelet})" if t % c.tubelet else ""
            raise ValueError(f"video has {t} frames{hint}, expected {expected}")
        if h != c.img_size or w != c.img_size:
            hint = f" (not divisible by patch {c.patch_size})" if h % c.patch_size or w % c.patch_size else ""
            raise ValueError(f"video is {h}x{w}{hint}, expected {expected}")
        if not video.is_floating_point():
            raise ValueError(f"video must be float in [0, 1] {expected}, got dtype {video.dtype}")
        if finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(video.sum())):
            raise ValueError(f"video {expected} contains NaN or Inf values")

    # ------------------------------------------------------------- encoder
    def ids_keep(self, batch: int, mask_ratio: float, mask_type: Optional[str] = None,
                 device=None, generator: Generators = None) -> torch.Tensor:
        """Visible-token indices ``[B, K]`` (global, ascending) for one masking draw."""
        return make_ids_keep(mask_type or self.cfg.mask_type, batch, self.cfg.t_grid, self.cfg.num_spatial,
                             mask_ratio, device=device, generator=generator)

    def forward_encoder(self, video: torch.Tensor, ids_keep: torch.Tensor,
                        return_layers: Sequence[int] = ()) -> tuple[torch.Tensor, list]:
        """Encode the visible tokens; returns normed tokens ``[B, K, D]`` (CLS removed) and the
        raw outputs of blocks ``return_layers`` (CLS removed) for dense heads."""
        x = self.patch_embed(video, ids_keep)
        pos = separable_pos_embed(self.pos_embed_spatial, self.pos_embed_temporal)
        x = x + gather_tokens(pos.expand(x.shape[0], -1, -1), ids_keep)
        cls = (self.cls_token + self.pos_embed_class).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        layers = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in return_layers:
                layers.append(x[:, 1:])
        return self.norm(x)[:, 1:], layers

    def encode(self, video: torch.Tensor, mask_ratio: float = 0.0, mask_type: Optional[str] = None
               ) -> torch.Tensor:
        """Encoder tokens ``[B, N, D]`` after the final norm, CLS removed, time-major order."""
        self.check_video(video)
        ids = self.ids_keep(video.shape[0], mask_ratio, mask_type, device=video.device)
        return self.forward_encoder(video, ids)[0]

    # ------------------------------------------------------------ projector
    def forward_projector(self, tokens: torch.Tensor, ids_keep: torch.Tensor,
                          equal_counts: Optional[bool] = None) -> torch.Tensor:
        """One embedding per temporal index ``[B, T/t, D]``, all indices in one batched call.

        Visible tokens are grouped by temporal index; when indices keep different numbers of
        tokens (random masking) the groups are padded and the padding is masked out of attention.
        ``equal_counts`` (known for uniform/consistent masking) spares a data-dependent check.
        """
        b, k, d = tokens.shape
        t, L = self.cfg.t_grid, self.cfg.num_spatial
        t_idx = torch.div(ids_keep, L, rounding_mode="floor")
        attn_mask = None
        if equal_counts is None:
            counts = torch.zeros(b, t, dtype=torch.long, device=tokens.device).scatter_add_(
                1, t_idx, torch.ones_like(t_idx))
            equal_counts = k % t == 0 and bool((counts == k // t).all())
        if equal_counts:
            groups = tokens.reshape(b * t, k // t, d)                  # ids_keep ascending => contiguous
        else:
            counts = torch.zeros(b, t, dtype=torch.long, device=tokens.device).scatter_add_(
                1, t_idx, torch.ones_like(t_idx))
            width = int(counts.max())
            starts = counts.cumsum(1) - counts
            rank = torch.arange(k, device=tokens.device).expand(b, k) - starts.gather(1, t_idx)
            groups = tokens.new_zeros(b, t, width, d)
            groups[torch.arange(b, device=tokens.device)[:, None], t_idx, rank] = tokens
            groups = groups.reshape(b * t, width, d)
            valid = torch.arange(width, device=tokens.device) < counts.reshape(b * t, 1)
            valid = torch.cat([valid.new_ones(b * t, 1), valid], dim=1)
            attn_mask = valid[:, None, None, :]
        cls = self.projector_cls_token.expand(b * t, -1, -1)
        x = self.projector(torch.cat([cls, groups], dim=1), attn_mask=attn_mask)
        return self.projector_norm(x[:, 0]).reshape(b, t, d)

    def frame_embeddings(self, video: torch.Tensor) -> torch.Tensor:
        """Projector CLS outputs ``[B, T/t, D]`` with no masking (one per temporal index)."""
        self.check_video(video)
        ids = self.ids_keep(video.shape[0], 0.0, device=video.device)
        tokens, _ = self.forward_encoder(video, ids)
        return self.forward_projector(tokens, ids, equal_counts=True)

    # -------------------------------------------------------------- decoder
    def forward_decoder(self, tokens: torch.Tensor, ids_keep: torch.Tensor,
                        predict_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict the target patches of every token ``[B, N, t_pred*p*p*C]`` (or only of the
        positions ``predict_at`` ``[B, M]``, e.g. the removed tokens the loss needs).

        Visible tokens are scattered back to their original positions (the true inverse of the
        masking permutation); every other position gets the mask token.
        """
        x = self.decoder_embed(tokens)
        b, _, dd = x.shape
        full = self.mask_token.to(x.dtype).expand(b, self.cfg.num_tokens, dd)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, dd), x)
        full = full + separable_pos_embed(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal)
        cls = (self.decoder_cls_token + self.decoder_pos_embed_class).expand(b, -1, -1)
        x = torch.cat([cls, full], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = x[:, 1:]
        if predict_at is not None:
            x = gather_tokens(x, predict_at)
        return self.decoder_pred(self.decoder_norm(x))

    def patchify_target(self, video: torch.Tensor) -> torch.Tensor:
        """Target frames (one per tubelet in the paper) as ``[B, N, u*p*p*C]``, channels last."""
        c = self.cfg
        idx = torch.linspace(0, c.num_frames - 1, c.pred_frames, device=video.device).long()
        frames = video.index_select(2, idx)
        b, ch = frames.shape[:2]
        u, p, s = c.pred_tubelet, c.patch_size, c.s_grid
        x = frames.reshape(b, ch, c.t_grid, u, s, p, s, p)
        x = torch.einsum("bctuhpwq->bthwupqc", x)
        return x.reshape(b, c.num_tokens, u * p * p * ch)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify_target`: ``[B, N, u*p*p*C]`` -> ``[B, C, T_pred, H, W]``."""
        c = self.cfg
        b = patches.shape[0]
        u, p, s = c.pred_tubelet, c.patch_size, c.s_grid
        x = patches.reshape(b, c.t_grid, s, s, u, p, p, c.in_chans)
        x = torch.einsum("bthwupqc->bctuhpwq", x)
        return x.reshape(b, c.in_chans, c.t_grid * u, s * p, s * p)

    # -------------------------------------------------------------- training
    def forward(self, video: torch.Tensor, mask_ratio: Optional[float] = None,
                generator: Generators = None) -> tuple[torch.Tensor, dict]:
        """One pretraining step's loss and its parts (detached, for logging)."""
        c = self.cfg
        self.check_video(video, finite=not self.training)
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        b = video.shape[0]
        ids = self.ids_keep(b, ratio, device=video.device, generator=generator)
        tokens, _ = self.forward_encoder(video, ids)
        mask = mask_from_ids_keep(ids, c.num_tokens)
        target = self.patchify_target(video)
        if ids.shape[1] < c.num_tokens:  # the loss reads only removed tokens: predict just those
            removed = mask.argsort(dim=1, descending=True, stable=True)[:, :c.num_tokens - ids.shape[1]]
            pred, target = self.forward_decoder(tokens, ids, removed), gather_tokens(target, removed)
        else:                            # ratio 0: plain autoencoding of every token
            pred = self.forward_decoder(tokens, ids)
        emb = None
        if c.contrastive != "none" and c.contrastive_weight > 0:
            emb = self.forward_projector(tokens, ids, equal_counts=c.mask_type != "random")
            if c.contrastive == "triplet":
                with torch.no_grad():  # labels only: pairs from uniform-frame masking
                    ids_u = self.ids_keep(b, ratio, "uniform", device=video.device, generator=generator)
                    tok_u, _ = self.forward_encoder(video, ids_u)
                    emb_u = self.forward_projector(tok_u, ids_u, equal_counts=True)
        with torch.autocast(video.device.type, enabled=False):  # losses in fp32
            rec = losses.reconstruction_loss(pred.float(), target.float(), torch.ones_like(pred[..., 0]),
                                             c.norm_pix_loss)
            parts = {"recon": rec.detach()}
            loss = rec
            if emb is not None:
                emb = emb.float()
                if c.contrastive == "triplet":
                    pos, neg = losses.triplet_labels(losses.l2_distance_matrix(emb_u.float()))
                    con, active = losses.triplet_loss(emb, pos, neg, c.triplet_margin)
                    parts.update(triplet=con.detach(), triplet_active=active)
                else:
                    prior = losses.pixel_prior(video, c.t_grid)
                    con, extra = losses.pixel_prior_loss(emb, prior, c.triplet_margin, c.kl_weight,
                                                         c.kl_temperature)
                    parts.update(extra)
                loss = loss + c.contrastive_weight * con
                parts["contrastive"] = con.detach()
        parts["loss"] = loss.detach()
        return loss, parts

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, mask_ratio: Optional[float] = None,
                    generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted target frames ``[B, C, T_pred, H, W]`` (visible patches pasted from the input)
        and the token mask ``[B, N]`` (1 = removed), for visual checks."""
        self.check_video(video)
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        ids = self.ids_keep(video.shape[0], ratio, device=video.device, generator=generator)
        tokens, _ = self.forward_encoder(video, ids)
        pred = self.forward_decoder(tokens, ids).float()
        target = self.patchify_target(video).float()
        if self.cfg.norm_pix_loss:  # predictions are per-patch normalised: undo with the target stats
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        mask = mask_from_ids_keep(ids, self.cfg.num_tokens)
        pred = torch.where(mask.bool().unsqueeze(-1), pred, target)
        return self.unpatchify(pred).clamp(0, 1), mask
