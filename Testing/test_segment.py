"""Segmentation head, fine-tuning on phantoms (labelled frames only) through the general loop,
evaluation, the task checkpoint, and old ``echofm-segmenter-v1`` files still loading."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from EchoFMEngine.data.phantom import segmentation_items
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.heads import ENCODER_UNUSED, EchoFMSegmenter, SegmentationHead
from EchoFMEngine.models.task_checkpoint import load_task_model, save_task_model
from EchoFMEngine.training import finetune
from EchoFMEngine.training import segment as S

IMG, FRAMES = 32, 8
NO_AUG = ["data.augment=false"]


def write_legacy_segmenter(model: EchoFMSegmenter, folder, extra=None):
    """A folder in the retired ``echofm-segmenter-v1`` layout, built from its documented form (no writer
    of it is left): ``model.safetensors`` (encoder keys ``encoder.*`` without the MAE decoder and projector,
    head keys ``head.*``; metadata ``format`` and ``description``) and the same description in ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    desc = {"format": "echofm-segmenter-v1", "task": "segment",
            "labels": {"0": "background", "1": "lv_cavity", "2": "lv_myocardium", "3": "la"},
            "structures": {"lv_endo": [1], "lv_epi": [1, 2], "la": [3]},
            "input": {"frames": c.num_frames, "height": c.img_size, "width": c.img_size, "channels": c.in_chans,
                      "value_range": [0.0, 1.0], "layout": "[B, C, T, H, W]"},
            "n_classes": model.head.n_classes, "head": {"layers": model.head.layers, "width": model.head.width},
            "encoder_config": c.to_dict(), **(extra or {})}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not k.startswith(tuple(f"encoder.{u}" for u in ENCODER_UNUSED))}
    save_file(tensors, str(folder / "model.safetensors"),
              metadata={"format": "echofm-segmenter-v1", "description": json.dumps(desc)})
    (folder / "config.json").write_text(json.dumps(desc, indent=2))
    return folder


def tiny_encoder(**kw):
    torch.manual_seed(0)
    return build_echofm("tiny", img_size=IMG, num_frames=FRAMES, **kw)


@pytest.fixture(scope="module")
def items():
    return segmentation_items(3, IMG, FRAMES, seed=7)


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
    model = finetune.fit(enc, "segment", items, ["run.steps=3", "optim.lr=1e-3", "run.batch_size=2", "head.mode=frozen",
                                                 *NO_AUG])
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert model.training and not model.encoder.training
    for name, p in enc.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], p, rtol=0, atol=0)
    torch.manual_seed(0)                       # fit (run.seed=0) builds its head after this
    head0 = SegmentationHead(enc.cfg)
    changed = [not torch.equal(a, b) for a, b in zip(model.head.state_dict().values(),
                                                     head0.state_dict().values())]
    assert any(changed)


def test_full_finetune_changes_encoder_but_not_the_argument(items):
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    model = finetune.fit(enc, "segment", items, ["run.steps=2", "optim.lr=1e-3", "run.batch_size=2", *NO_AUG])
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
    model = finetune.fit(tiny_encoder(), "segment", items, ["run.steps=25", "optim.lr=3e-3", "run.batch_size=3",
                                                            "optim.warmup_steps=3", "run.log_every=1", *NO_AUG])
    h = model.history
    assert len(h) == 25 and sum(h[-5:]) / 5 < 0.8 * sum(h[:5]) / 5
    r = S.evaluate_segmentation(model, items, n_boot=50)
    assert set(r["structures"]) == {"lv_endo", "lv_epi", "la"}
    assert r["n_frames"] == sum(int(it["mask_valid"].sum()) for it in items)
    for s in r["structures"].values():
        assert 0.0 <= s["dice"] <= 1.0 and s["dice_ci95"][0] <= s["dice"] <= s["dice_ci95"][1]
    assert 0.0 <= r["mean_dice"] <= 1.0


def test_saved_segmenter_round_trips_exactly_and_says_its_task(tmp_path, items):
    model = finetune.fit(tiny_encoder(), "segment", items, ["run.steps=2", "run.batch_size=2", *NO_AUG])
    desc = {**finetune.model_description(model, "segment", list(S.SEG_LABELS), "phantom"), "note": "test"}
    folder = save_task_model(model, tmp_path / "seg", desc)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["task"] == "segment" and saved["labels"][3] == "la" and saved["note"] == "test"
    assert saved["input"]["frames"] == FRAMES and saved["input"]["height"] == IMG
    assert saved["format"] == "echofm-task-v1"
    loaded = load_task_model(folder, task="segment")
    assert loaded.description["task"] == "segment"
    own = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith(tuple(f"encoder.{u}" for u in ENCODER_UNUSED)):
            assert torch.equal(value, own[key]), key
    video = S.collate(items)["video"]
    with torch.no_grad():
        assert torch.equal(loaded(video), model.eval()(video))


def test_an_old_segmenter_v1_folder_still_loads_exactly(tmp_path, items):
    model = EchoFMSegmenter(tiny_encoder()).eval()
    with torch.no_grad():
        model.head.out.weight.normal_()              # weights a fresh head would not have
    folder = write_legacy_segmenter(model, tmp_path / "legacy", extra={"trained_on": "EchoFM phantoms (demo)"})
    loaded = load_task_model(folder, task="segment")
    assert loaded.description["labels"] == ["background", "lv_cavity", "lv_myocardium", "la"]
    assert loaded.description["trained_on"] == "EchoFM phantoms (demo)"
    assert loaded.head_config()["kind"] == "segmenter" and loaded.head.width == model.head.width
    video = S.collate(items)["video"]
    with torch.no_grad():
        assert torch.equal(loaded(video), model(video))
    assert finetune.is_task_checkpoint(folder)


def test_an_encoder_checkpoint_is_not_a_segmenter(tmp_path):
    from EchoFMEngine.models import CheckpointError, save_pretrained
    save_pretrained(tiny_encoder(), tmp_path / "enc")
    with pytest.raises(CheckpointError, match="encoder-only EchoFM checkpoint"):
        load_task_model(tmp_path / "enc", task="segment")


# ------------------------------------------------------------------ per-frame loss weights
def frames_and_logits(items, k=3):
    torch.manual_seed(1)
    target = torch.cat([it["masks"][it["mask_valid"]] for it in items])[:k]
    return torch.randn(len(target), 4, IMG, IMG), target


def test_a_frame_of_weight_0_is_absent_and_of_weight_2_counts_twice(items):
    logits, target = frames_and_logits(items)
    loss = S.segmentation_loss
    assert loss(logits, target, weight=torch.ones(3)) == pytest.approx(float(loss(logits, target)), rel=1e-6)
    torch.testing.assert_close(loss(logits, target, weight=torch.tensor([1.0, 0.0, 1.0])),
                               loss(logits[[0, 2]], target[[0, 2]]))
    torch.testing.assert_close(loss(logits, target, weight=torch.tensor([1.0, 2.0, 1.0])),
                               loss(logits[[0, 1, 1, 2]], target[[0, 1, 1, 2]]))


def test_a_weight_scales_its_frames_share_of_the_cross_entropy(items):
    logits, target = frames_and_logits(items, k=2)
    ce = [float(S.segmentation_loss(logits[[k]], target[[k]], dice_weight=0.0)) for k in range(2)]
    for w in (0.5, 0.25):
        got = S.segmentation_loss(logits, target, dice_weight=0.0, weight=torch.tensor([1.0, w]))
        assert float(got) == pytest.approx((ce[0] + w * ce[1]) / (1 + w), rel=1e-5)


def test_batch_loss_follows_mask_weight(items):
    model = EchoFMSegmenter(tiny_encoder()).eval()
    batch = S.collate(items[:2])
    valid = batch["mask_valid"]
    drop = torch.nonzero(valid[0]).flatten()[-1]             # one labelled frame of clip 0
    weight = valid.float()
    weight[0, drop] = 0.0
    without = {**batch, "mask_valid": valid.clone()}
    without["mask_valid"][0, drop] = False
    with torch.no_grad():
        torch.testing.assert_close(S.batch_loss(model, {**batch, "mask_weight": weight}), S.batch_loss(model, without))
        assert S.batch_loss(model, {**batch, "mask_weight": valid.float()}) == S.batch_loss(model, batch)
