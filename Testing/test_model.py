"""The EchoFM model: shapes, masking properties, projector, decoder placement, losses, bad input."""
from __future__ import annotations

import pytest
import torch

from EchoFMEngine.models import build_echofm, make_config
from EchoFMEngine.models import losses
from EchoFMEngine.models.echofm import gather_tokens, separable_pos_embed
from EchoFMEngine.models.masking import make_ids_keep, mask_from_ids_keep

TINY = dict(img_size=32, num_frames=8, tubelet=2, patch_size=8, embed_dim=48, depth=2, num_heads=3,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def video(b=2, cfg=None, seed=0):
    cfg = cfg or make_config("tiny", **TINY)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_echofm("tiny", **TINY).eval()


def test_public_api_shapes(model):
    c, v = model.cfg, video()
    assert model.encode(v).shape == (2, c.num_tokens, c.embed_dim)
    assert model.encode(v, mask_ratio=0.75).shape == (2, c.t_grid * int(c.num_spatial * 0.25), c.embed_dim)
    assert model.frame_embeddings(v).shape == (2, c.t_grid, c.embed_dim)
    frames, mask = model.reconstruct(v, 0.75)
    assert frames.shape == (2, 3, c.pred_frames, c.img_size, c.img_size) and mask.shape == (2, c.num_tokens)
    loss, parts = model(v)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"recon", "triplet", "contrastive", "loss", "triplet_active"} <= set(parts)


@pytest.mark.parametrize("kind", ["random", "uniform", "consistent"])
def test_ratio_zero_keeps_every_token_in_order(kind):
    ids = make_ids_keep(kind, 3, 4, 16, 0.0)
    assert torch.equal(ids, torch.arange(64).expand(3, 64))


def test_random_masking_counts_and_order():
    ids = make_ids_keep("random", 4, 4, 16, 0.75, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (4, 16)
    assert bool((ids[:, 1:] > ids[:, :-1]).all())          # ascending, unique
    per_t = torch.stack([(ids // 16 == t).sum(1) for t in range(4)], 1)
    assert bool((per_t != 4).any())                          # not uniform per frame in general


def test_uniform_frame_masking_same_count_per_index_different_places():
    ids = make_ids_keep("uniform", 2, 4, 16, 0.75, generator=torch.Generator().manual_seed(2))
    t, s = ids // 16, ids % 16
    for b in range(2):
        assert [(t[b] == i).sum().item() for i in range(4)] == [4, 4, 4, 4]
    spatial = s.view(2, 4, 4)
    assert not all(torch.equal(spatial[:, 0], spatial[:, i]) for i in range(1, 4))


def test_consistent_masking_shares_one_spatial_mask():
    ids = make_ids_keep("consistent", 3, 4, 16, 0.75, generator=torch.Generator().manual_seed(3))
    spatial = (ids % 16).view(3, 4, 4)
    for i in range(1, 4):
        assert torch.equal(spatial[:, 0], spatial[:, i])
    assert not torch.equal(spatial[0, 0], spatial[1, 0])     # differs between clips


def test_mask_from_ids_keep():
    ids = torch.tensor([[0, 3]])
    assert mask_from_ids_keep(ids, 5).tolist() == [[0, 1, 1, 0, 1]]


def test_position_embeddings_follow_global_indices():
    """With no blocks, each visible token is norm(tubelet embedding + the table entry of its own
    global (temporal, spatial) position), computed here from the full tables independently."""
    m = build_echofm("tiny", **{**TINY, "depth": 0}).eval()
    v = video()
    with torch.no_grad():
        table = m.pos_embed_temporal[0][:, None, :] + m.pos_embed_spatial[0][None, :, :]   # [T, L, D]
        every = m.patch_embed(v) + table.reshape(1, -1, table.shape[-1])
        for kind in ("random", "uniform", "consistent"):
            ids = m.ids_keep(2, 0.75, kind, generator=torch.Generator().manual_seed(4))
            part, _ = m.forward_encoder(v, ids)
            torch.testing.assert_close(part, m.norm(gather_tokens(every, ids)), rtol=0, atol=1e-5)


def test_decoder_sees_every_token_at_its_position():
    """With no decoder blocks, the prediction at a visible position comes from that token only."""
    m = build_echofm("tiny", **{**TINY, "decoder_depth": 0}).eval()
    v = video()
    ids = m.ids_keep(2, 0.75, "random", generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens, _ = m.forward_encoder(v, ids)
        pred = m.forward_decoder(tokens, ids)
        pos = separable_pos_embed(m.decoder_pos_embed_spatial, m.decoder_pos_embed_temporal).expand(2, -1, -1)
        expect_vis = m.decoder_pred(m.decoder_norm(m.decoder_embed(tokens) + gather_tokens(pos, ids)))
        torch.testing.assert_close(gather_tokens(pred, ids), expect_vis, rtol=0, atol=1e-6)
        masked = mask_from_ids_keep(ids, m.cfg.num_tokens).bool()
        expect_mask = m.decoder_pred(m.decoder_norm(m.mask_token + pos))
        torch.testing.assert_close(pred[masked], expect_mask[masked], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["consistent", "random"])
def test_batched_projector_equals_a_loop_over_temporal_indices(model, kind):
    v = video()
    ids = model.ids_keep(2, 0.75, kind, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        tokens, _ = model.forward_encoder(v, ids)
        batched = model.forward_projector(tokens, ids)
        L = model.cfg.num_spatial
        for b in range(2):
            for t in range(model.cfg.t_grid):
                group = tokens[b, (ids[b] // L) == t]
                x = torch.cat([model.projector_cls_token[0], group], 0)[None]
                one = model.projector_norm(model.projector(x)[:, 0])[0]
                torch.testing.assert_close(batched[b, t], one, rtol=1e-5, atol=1e-5)


def test_patchify_roundtrip(model):
    v = video()
    target = model.patchify_target(v)
    idx = torch.linspace(0, model.cfg.num_frames - 1, model.cfg.pred_frames).long()
    assert torch.equal(model.unpatchify(target), v[:, :, idx])


def test_triplet_labels_exclude_neighbours_and_follow_row_mean():
    # period-4 distance structure: same phase -> 0.1, otherwise 1.0
    t = 8
    idx = torch.arange(t)
    dist = torch.where((idx[:, None] - idx[None]) % 4 == 0, 0.1, 1.0).float()
    dist.fill_diagonal_(0)
    pos, neg = losses.triplet_labels(dist[None])
    assert pos[0, 0].nonzero().flatten().tolist() == [4]
    assert neg[0, 0].nonzero().flatten().tolist() == [2, 3, 5, 6, 7]   # 1 is adjacent
    assert not bool(pos[0].diagonal().any()) and not bool(neg[0].diagonal().any())


def test_triplet_loss_zero_when_margin_satisfied_and_positive_otherwise():
    t = 8
    phase = torch.arange(t) % 4
    emb_good = torch.nn.functional.one_hot(phase, 4).float()[None]       # same phase -> identical
    dist = losses.l2_distance_matrix(emb_good)
    pos, neg = losses.triplet_labels(dist)
    loss, active = losses.triplet_loss(emb_good, pos, neg, margin=0.2)
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and active.item() == 0.0
    emb_bad = torch.nn.functional.one_hot(torch.arange(t) % 8, 8).float()[None]
    loss_bad, _ = losses.triplet_loss(emb_bad, pos, neg, margin=0.2)
    assert loss_bad.item() == pytest.approx(0.2, abs=1e-4)


def test_pixel_prior_variant_and_none():
    v = video()
    for contrastive, keys in (("pixel", {"kl", "triplet", "contrastive"}), ("none", set())):
        m = build_echofm("tiny", **TINY, contrastive=contrastive)
        loss, parts = m(v)
        assert torch.isfinite(loss) and keys <= set(parts)
        if contrastive == "none":
            assert "contrastive" not in parts


def test_norm_pix_loss_changes_the_target():
    v = video()
    torch.manual_seed(0)
    a = build_echofm("tiny", **TINY, contrastive="none")
    b = build_echofm("tiny", **TINY, contrastive="none", norm_pix_loss=True)
    b.load_state_dict(a.state_dict())
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert a(v, generator=g())[0].item() != pytest.approx(b(v, generator=g())[0].item())


def test_loss_decreases_on_tiny_overfit():
    torch.manual_seed(0)
    m = build_echofm("tiny", **TINY)
    v = video(b=2, seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    first = None
    for step in range(40):
        loss, parts = m(v, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = parts["recon"].item() if first is None else first
    assert parts["recon"].item() < 0.5 * first


def test_vit_l_parameter_counts():
    with torch.device("meta"):
        m = build_echofm("vit_l")
    total = sum(p.numel() for p in m.parameters())
    decoder_side = ("decoder", "projector", "mask_token")
    encoder = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(decoder_side))
    assert round(encoder / 1e6, 1) == 305.7
    assert round(total / 1e6, 1) == 344.5


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 8, 32), "5 dims"),
    ((2, 1, 8, 32, 32), "channels"),
    ((2, 3, 7, 32, 32), "not divisible by tubelet"),
    ((2, 3, 8, 30, 30), "not divisible by patch"),
    ((2, 3, 8, 48, 48), "expected"),
])
def test_bad_video_shapes_name_the_expected_shape(model, shape, message):
    with pytest.raises(ValueError, match=message) as err:
        model.encode(torch.rand(*shape))
    assert "[B, 3, 8, 32, 32]" in str(err.value)


def test_non_finite_video_is_refused(model):
    v = video()
    v[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(v)


def test_bad_configs():
    with pytest.raises(ValueError, match="not divisible by tubelet"):
        make_config("tiny", num_frames=10)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        make_config("tiny", img_size=60)
    with pytest.raises(KeyError, match="did you mean 'mask_ratio'"):
        build_echofm("tiny", mask_ration=0.5)
    with pytest.raises(KeyError, match="unknown EchoFM preset"):
        build_echofm("vit_xl")


def test_per_sample_generators_make_masks_independent_of_batch_composition():
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = make_ids_keep("consistent", 2, 4, 16, 0.75, generator=gens([10, 11]))
    alone = make_ids_keep("consistent", 1, 4, 16, 0.75, generator=gens([11]))
    assert torch.equal(both[1:], alone)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        make_ids_keep("random", 2, 4, 16, 0.75, generator=gens([1, 2, 3]))
