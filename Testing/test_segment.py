"""Segmentation head, fine-tuning on phantoms (labelled frames only), evaluation and checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.heads import EchoFMSegmenter, SegmentationHead
from EchoFMEngine.training import segment as S

IMG, FRAMES = 32, 8


def tiny_encoder(**kw):
    torch.manual_seed(0)
    return build_echofm("tiny", img_size=IMG, num_frames=FRAMES, **kw)


@pytest.fixture(scope="module")
def items():
    return S.phantom_segmentation_items(3, IMG, FRAMES, seed=7)


def test_items_are_model_sized_and_labelled_at_ed_es_only(items):
    for it in items:
        assert it["video"].shape == (3, FRAMES, IMG, IMG) and it["video"].dtype == torch.float32
        assert it["masks"].shape == (FRAMES, IMG, IMG)
        assert set(it["masks"].unique().tolist()) <= {0, 1, 2, 3}
        assert 1 <= int(it["mask_valid"].sum()) < FRAMES
        assert it["spacing_mm"][0] > 0


@pytest.mark.parametrize("patch", [8, 4])
def test_head_output_shapes(patch):
    enc = tiny_encoder(patch_size=patch)
    model = EchoFMSegmenter(enc, n_classes=4)
    assert len(model.head.layers) == model.head.n_up - 1
    video = torch.rand(2, 3, FRAMES, IMG, IMG)
    assert model(video).shape == (2, 4, FRAMES, IMG, IMG)
    sel = torch.zeros(2, FRAMES, dtype=torch.bool)
    sel[0, 1] = sel[1, 5] = sel[1, 6] = True
    with torch.no_grad():
        part, full = model(video, frames=sel), model(video)
    assert part.shape == (3, 4, IMG, IMG)
    torch.testing.assert_close(part[2], full[1, :, 6], atol=1e-5, rtol=1e-4)
    assert model.predict(video).shape == (2, FRAMES, IMG, IMG)


def test_head_rejects_bad_settings():
    cfg = tiny_encoder().cfg
    with pytest.raises(ValueError, match="intermediate layers"):
        SegmentationHead(cfg, layers=[0])
    with pytest.raises(ValueError, match="power-of-2"):
        SegmentationHead(cfg.with_overrides(patch_size=6, img_size=36))


def test_frozen_encoder_stays_fixed_while_the_head_learns(items):
    enc = tiny_encoder()
    model = S.finetune_segmentation(enc, items, steps=3, lr=1e-3, batch_size=2, freeze_encoder=True,
                                    augment=False)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert model.training and not model.encoder.training
    for name, p in enc.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], p, rtol=0, atol=0)
    torch.manual_seed(0)                       # finetune_segmentation(seed=0) builds its head after this
    head0 = SegmentationHead(enc.cfg)
    changed = [not torch.equal(a, b) for a, b in zip(model.head.state_dict().values(),
                                                     head0.state_dict().values())]
    assert any(changed)


def test_full_finetune_changes_encoder_but_not_the_argument(items):
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    model = S.finetune_segmentation(enc, items, steps=2, lr=1e-3, batch_size=2, augment=False)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    assert torch.equal(model.encoder.mask_token, enc.mask_token)        # unused parts left alone


def test_loss_ignores_unlabelled_frames(items):
    model = EchoFMSegmenter(tiny_encoder()).eval()
    batch = S.collate(items[:2])
    unlabelled = torch.nonzero(~batch["mask_valid"][0]).flatten()[0]
    other = {**batch, "masks": batch["masks"].clone()}
    other["masks"][0, unlabelled] = 3 - other["masks"][0, unlabelled].clamp(max=3)
    assert not torch.equal(other["masks"], batch["masks"])
    with torch.no_grad():
        assert S.batch_loss(model, batch) == S.batch_loss(model, other)
        labelled = torch.nonzero(batch["mask_valid"][0]).flatten()[0]
        other["masks"][0, labelled] = 3 - other["masks"][0, labelled]
        assert S.batch_loss(model, batch) != S.batch_loss(model, other)


def test_layer_decay_scales_encoder_lrs_by_depth():
    model = EchoFMSegmenter(tiny_encoder())
    groups = S.param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    head_ids = {id(p) for p in model.head.parameters()}
    depth = model.cfg.depth
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(lr_of[i] == 1.0 for i in head_ids)
    assert lr_of[id(model.encoder.patch_embed.proj.weight)] == pytest.approx(0.5 ** (depth + 1))
    assert lr_of[id(model.encoder.blocks[depth - 1].attn.qkv.weight)] == pytest.approx(0.5)
    assert lr_of[id(model.encoder.blocks[0].attn.qkv.weight)] == pytest.approx(0.5 ** depth)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))


def test_tiny_finetune_decreases_the_loss_and_evaluates(items):
    model = S.finetune_segmentation(tiny_encoder(), items, steps=25, lr=3e-3, batch_size=3, augment=False,
                                    warmup=3)
    h = model.history
    assert len(h) == 25 and sum(h[-5:]) / 5 < 0.8 * sum(h[:5]) / 5
    r = S.evaluate_segmentation(model, items, n_boot=50)
    assert set(r["structures"]) == {"lv_endo", "lv_epi", "la"}
    assert r["n_frames"] == sum(int(it["mask_valid"].sum()) for it in items)
    for s in r["structures"].values():
        assert 0.0 <= s["dice"] <= 1.0 and s["dice_ci95"][0] <= s["dice"] <= s["dice_ci95"][1]
    assert 0.0 <= r["mean_dice"] <= 1.0


def test_saved_segmenter_round_trips_exactly_and_says_its_task(tmp_path, items):
    model = S.finetune_segmentation(tiny_encoder(), items, steps=2, batch_size=2, augment=False)
    folder = S.save_segmenter(model, tmp_path / "seg", extra={"note": "test"})
    desc = json.loads((folder / "config.json").read_text())
    assert desc["task"] == "segment" and desc["labels"]["3"] == "la" and desc["note"] == "test"
    assert desc["input"]["frames"] == FRAMES and desc["input"]["height"] == IMG
    loaded = S.load_segmenter(folder)
    assert loaded.description["task"] == "segment"
    own = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith(tuple(f"encoder.{u}" for u in S.ENCODER_UNUSED)):
            assert torch.equal(value, own[key]), key
    video = S.collate(items)["video"]
    with torch.no_grad():
        assert torch.equal(loaded(video), model.eval()(video))


def test_load_segmenter_refuses_an_encoder_checkpoint(tmp_path):
    from EchoFMEngine.models import CheckpointError, save_pretrained
    save_pretrained(tiny_encoder(), tmp_path / "enc")
    with pytest.raises(CheckpointError, match="not an EchoFM segmenter"):
        S.load_segmenter(tmp_path / "enc")
