"""Losses of EchoFM: masked reconstruction and the periodic contrastive loss (paper Sec. III-B/C).

The contrastive loss works on per-temporal-index embeddings ``[B, T, D]`` from the periodic
projector. Two variants:

* ``triplet_loss`` (paper eq. 3, the default): positives/negatives are read off an L2
  self-similarity matrix computed under *uniform-frame* masking (``labels_from``), the loss is
  measured on embeddings computed under *consistent* masking; indices adjacent to the anchor are
  never negatives.
* ``pixel_prior_loss``: positives/negatives from a pixel-space cycle prior, hardest-pair mining in
  cosine space, plus a KL term between the prior and the embedding similarity per row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        norm_pix: bool = False) -> torch.Tensor:
    """Mean squared error over removed tokens (all tokens when nothing is masked)."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_token = ((pred - target) ** 2).mean(dim=-1)
    # With nothing masked (ratio 0) every token counts; decided on-device, no host sync.
    weights = torch.where(mask.sum() > 0, mask, torch.ones_like(mask))
    return (per_token * weights).sum() / weights.sum()


def l2_distance_matrix(emb: torch.Tensor) -> torch.Tensor:
    """Pairwise L2 distances ``[B, T, T]`` between L2-normalised embeddings (scale-free margin)."""
    z = F.normalize(emb, dim=-1)
    sq = (2.0 - 2.0 * z @ z.transpose(1, 2)).clamp_min(0.0)
    return (sq + 1e-12).sqrt() * (1 - torch.eye(emb.shape[1], device=emb.device, dtype=emb.dtype))


def _non_adjacent(t: int, device) -> torch.Tensor:
    idx = torch.arange(t, device=device)
    return (idx[None, :] - idx[:, None]).abs() > 1


def triplet_labels(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive / negative masks ``[B, T, T]`` from a distance matrix.

    Positive: closer to the anchor than the row mean (same cardiac phase), anchor excluded.
    Negative: the rest, with the anchor and its temporal neighbours excluded.
    """
    b, t, _ = dist.shape
    eye = torch.eye(t, dtype=torch.bool, device=dist.device)
    row_mean = dist.masked_fill(eye, 0).sum(-1, keepdim=True) / max(t - 1, 1)
    close = dist < row_mean
    pos = close & ~eye
    neg = ~close & _non_adjacent(t, dist.device)
    return pos, neg


def _per_sample_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's valid entries, then over samples (a sample with none counts 0),
    so a batch split across processes averages to the same loss."""
    b = values.shape[0]
    v, m = values.reshape(b, -1), valid.reshape(b, -1).to(values.dtype)
    return ((v * m).sum(1) / m.sum(1).clamp_min(1)).mean()


def _active_fraction(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Share of valid entries that still violate the margin (0 when there are none)."""
    return (((values > 0) & valid).sum() / valid.sum().clamp_min(1)).detach().float()


def triplet_loss(emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``relu(d(a,p) - d(a,n) + margin)`` over every valid (anchor, positive, negative).

    Returns the loss and the fraction of triplets that still violate the margin.
    """
    dist = l2_distance_matrix(emb)
    valid = pos.unsqueeze(-1) & neg.unsqueeze(-2)                       # [B, a, p, n]
    viol = F.relu(dist.unsqueeze(-1) - dist.unsqueeze(-2) + margin)     # d(a,p) - d(a,n)
    return _per_sample_mean(viol, valid), _active_fraction(viol, valid)


def pixel_prior(video: torch.Tensor, t_grid: int, pool: int = 32) -> torch.Tensor:
    """Cosine similarity ``[B, T, T]`` of grey, tubelet-averaged, pooled, mean-centred frames."""
    with torch.no_grad():
        b, _, t, h, w = video.shape
        grey = video.float().mean(dim=1).view(b, t_grid, t // t_grid, h, w).mean(dim=2)
        x = F.adaptive_avg_pool2d(grey, (pool, pool)).flatten(2)
        x = F.normalize(x - x.mean(dim=-1, keepdim=True), dim=-1)
        return x @ x.transpose(1, 2)


def pixel_prior_loss(emb: torch.Tensor, prior: torch.Tensor, margin: float, kl_weight: float,
                     temperature: float) -> tuple[torch.Tensor, dict]:
    """Hardest-pair cosine triplet under a pixel prior, plus a row-wise KL(prior || embedding)."""
    b, t, _ = prior.shape
    z = F.normalize(emb, dim=-1)
    sim = z @ z.transpose(1, 2)
    eye = torch.eye(t, dtype=torch.bool, device=emb.device)
    row_mean = prior.masked_fill(eye, 0).sum(-1, keepdim=True) / max(t - 1, 1)
    above = prior > row_mean
    pos = above & ~eye
    neg = ~above & _non_adjacent(t, emb.device)
    hardest_pos = sim.masked_fill(~pos, float("inf")).amin(-1)
    hardest_neg = sim.masked_fill(~neg, float("-inf")).amax(-1)
    valid = pos.any(-1) & neg.any(-1)
    # anchors without a positive or a negative have +-inf here; they are masked out below
    per_anchor = F.relu(torch.where(valid, hardest_neg - hardest_pos, torch.zeros_like(hardest_pos)) + margin)
    trip = _per_sample_mean(per_anchor, valid)
    active = _active_fraction(per_anchor, valid)
    off = ~eye.expand(b, t, t)
    log_p = F.log_softmax(prior[off].view(b, t, t - 1).float() / temperature, dim=-1)
    log_q = F.log_softmax(sim[off].view(b, t, t - 1) / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    loss = trip + kl_weight * kl
    return loss, {"triplet": trip.detach(), "kl": kl.detach(), "triplet_active": active}
