"""A naive EchoFM laid out exactly like the released weights, for equivalence checks and as the
speed baseline of ``bench model``.

It mirrors how the public reference computes (fp32, three separate q/k/v projections, attention
written out by hand, one projector call per temporal index, argsort-based unshuffling) so that
our optimised model can be compared with it number for number and second for second. Its
``state_dict()`` has the released key names, so it also serves as a generator of
"official-layout" checkpoint files in tests. Written from the facts in
../shared/spec/echofm-model.md.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class NaiveAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        split = lambda y: y.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, c))


class NaiveMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class NaiveBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = NaiveAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = NaiveMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, chans, dim, t, p):
        super().__init__()
        self.proj = nn.Conv3d(chans, dim, kernel_size=(t, p, p), stride=(t, p, p))

    def forward(self, x):
        x = self.proj(x)                                     # [B, D, T', h, w]
        return torch.einsum("bdts->btsd", x.flatten(3))      # [B, T', L, D]


class ReferenceEchoFM(nn.Module):
    """Released-layout EchoFM with consistent masking and the pixel-prior triplet loss."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 num_frames=32, t_patch_size=4, with_prj_norm=True, norm_pix_loss=False, margin=0.2):
        super().__init__()
        self.t_grid, self.side = num_frames // t_patch_size, img_size // patch_size
        self.L = self.side ** 2
        self.p, self.num_frames, self.norm_pix_loss, self.margin = patch_size, num_frames, norm_pix_loss, margin
        d, dd = embed_dim, decoder_embed_dim
        self.patch_embed = PatchEmbed(in_chans, d, t_patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed_spatial = nn.Parameter(torch.randn(1, self.L, d) * 0.02)
        self.pos_embed_temporal = nn.Parameter(torch.randn(1, self.t_grid, d) * 0.02)
        self.pos_embed_class = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(NaiveBlock(d, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_block = NaiveBlock(d, num_heads, mlp_ratio)
        self.decoder_prj_cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.prj_norm = nn.LayerNorm(d, eps=1e-6) if with_prj_norm else None
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dd) * 0.02)
        self.decoder_cls_token = nn.Parameter(torch.randn(1, 1, dd) * 0.02)
        self.decoder_pos_embed_spatial = nn.Parameter(torch.randn(1, self.L, dd) * 0.02)
        self.decoder_pos_embed_temporal = nn.Parameter(torch.randn(1, self.t_grid, dd) * 0.02)
        self.decoder_pos_embed_class = nn.Parameter(torch.randn(1, 1, dd) * 0.02)
        self.decoder_blocks = nn.ModuleList(NaiveBlock(dd, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, patch_size * patch_size * in_chans)
        with torch.no_grad():  # non-trivial norms so equivalence tests exercise them
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.add_(torch.randn_like(m.weight) * 0.1)
                    m.bias.add_(torch.randn_like(m.bias) * 0.1)

    def model_args(self) -> dict:
        return {"num_frames": self.num_frames, "t_patch_size": self.num_frames // self.t_grid,
                "pred_t_dim": self.t_grid, "sep_pos_embed": True, "cls_embed": True,
                "norm_pix_loss": self.norm_pix_loss, "num_heads": self.blocks[0].attn.heads,
                "decoder_num_heads": self.decoder_blocks[0].attn.heads}

    def _pos(self, spatial, temporal):
        return spatial.repeat(1, self.t_grid, 1) + torch.repeat_interleave(temporal, self.L, dim=1)

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x)
        b, t, L, c = x.shape
        x = x.reshape(b, t * L, c)
        keep = int(L * (1 - mask_ratio))
        spatial = torch.sort(torch.argsort(torch.rand(b, L, device=x.device), dim=1)[:, :keep], dim=1)[0]
        ids_keep = (spatial.unsqueeze(1) + torch.arange(t, device=x.device).view(1, t, 1) * L).reshape(b, -1)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, c))
        mask = torch.ones(b, t * L, device=x.device).scatter_(1, ids_keep, 0.0)
        ids_restore = torch.argsort(torch.argsort(mask, dim=1, stable=True), dim=1)
        pos = torch.gather(self._pos(self.pos_embed_spatial, self.pos_embed_temporal).expand(b, -1, -1), 1,
                           ids_keep.unsqueeze(-1).repeat(1, 1, c))
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
        x = x + torch.cat([self.pos_embed_class.expand(b, -1, -1), pos], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:], mask, ids_restore

    def forward_projector(self, latent):
        b, s, c = latent.shape
        x = latent.view(b, self.t_grid, s // self.t_grid, c)
        norm = self.prj_norm if self.prj_norm is not None else self.norm
        outs = []
        for i in range(self.t_grid):  # one call per temporal index, as the reference does
            y = torch.cat([self.decoder_prj_cls_token.expand(b, -1, -1), x[:, i]], 1)
            outs.append(norm(self.decoder_block(y))[:, 0])
        return torch.stack(outs, dim=1)

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        b, k, c = x.shape
        x = torch.cat([x, self.mask_token.repeat(b, self.t_grid * self.L - k, 1)], 1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).repeat(1, 1, c))
        x = torch.cat([self.decoder_cls_token.expand(b, -1, -1), x], 1)
        x = x + torch.cat([self.decoder_pos_embed_class.expand(b, -1, -1),
                           self._pos(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal).expand(b, -1, -1)],
                          1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        emb = F.normalize(self.forward_projector(latent), dim=-1)
        sim = emb @ emb.transpose(1, 2)
        with torch.no_grad():
            b, _, T, h, w = imgs.shape
            g = imgs.mean(1).view(b, self.t_grid, -1, h, w).mean(2)
            g = F.adaptive_avg_pool2d(g, (32, 32)).flatten(2)
            g = F.normalize(g - g.mean(-1, keepdim=True), dim=-1)
            prior = g @ g.transpose(1, 2)
        t = self.t_grid
        eye = torch.eye(t, dtype=torch.bool, device=imgs.device)
        idx = torch.arange(t, device=imgs.device)
        far = (idx[None] - idx[:, None]).abs() > 1
        above = prior > (prior.masked_fill(eye, 0).sum(-1, keepdim=True) / (t - 1))
        pos, neg = above & ~eye, ~above & far
        ap = sim.masked_fill(~pos, float("inf")).amin(-1)
        an = sim.masked_fill(~neg, float("-inf")).amax(-1)
        valid = pos.any(-1) & neg.any(-1)
        trip = F.relu(an - ap + self.margin)[valid].mean() if valid.any() else sim.sum() * 0
        pred = self.forward_decoder(latent, ids_restore)
        frames = imgs.index_select(2, torch.linspace(0, T - 1, t, device=imgs.device).long())
        p, s = self.p, self.side
        target = torch.einsum("nctuhpwq->nthwupqc", frames.reshape(b, 3, t, 1, s, p, s, p)).reshape(b, t * s * s, -1)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        rec = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return rec + trip, pred, mask
