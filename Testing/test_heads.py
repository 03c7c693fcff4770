"""Task heads: shapes, the 2D per-frame encoder, multi-view fusion with missing views, layer-wise lr
decay groups, and a frozen encoder that really stays frozen."""
from __future__ import annotations

import pytest
import torch

from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.heads import (EchoFMClassifier, EchoFMFrameSegmenter, EchoFMMultiView, EchoFMRegressor,
                                       EchoFMSegmenter, build_task_head, to_frame_encoder)
from EchoFMEngine.training.layer_decay import param_groups
from EchoFMEngine.training.task_eval import task_loss

IMG, FRAMES = 32, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def encoder(**kw):
    torch.manual_seed(0)
    return build_echofm("tiny", img_size=IMG, num_frames=FRAMES, tubelet=2, **kw)


def video(b=2, t=FRAMES, seed=1):
    return torch.rand(b, 3, t, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def test_pooled_heads_shapes_and_outputs():
    v = video()
    clf = EchoFMClassifier(encoder(), n_classes=5).eval()
    assert clf(v).shape == (2, 5)
    p = clf.predict_proba(v)
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    reg = EchoFMRegressor(encoder(), target_mean=50.0, target_std=10.0).eval()
    assert reg(v).shape == (2,)
    torch.testing.assert_close(reg.predict(v), reg(v) * 10.0 + 50.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        EchoFMClassifier(encoder(), n_classes=1)
    with pytest.raises(ValueError, match="frames"):
        clf(video(t=FRAMES // 2))


def test_rebuilt_from_head_config_gives_the_same_outputs():
    v = video()
    for model in (EchoFMClassifier(encoder(), 3, dropout=0.1), EchoFMRegressor(encoder(), target_std=2.0),
                  EchoFMMultiView(encoder(), fusion="mean"), EchoFMSegmenter(encoder(), 4, width=8)):
        twin = build_task_head(encoder(), model.head_config())
        twin.load_state_dict(model.state_dict())
        model.eval(), twin.eval()
        with torch.no_grad():
            if isinstance(model, EchoFMMultiView):
                x, m = torch.stack([v, v], 1), torch.tensor([[True, False], [True, True]]).repeat(1, 2)
                x = x.repeat(1, 2, 1, 1, 1, 1)
                assert torch.equal(model(x, m), twin(x, m))
            else:
                assert torch.equal(model(v), twin(v))


def test_frame_encoder_equals_the_video_encoder_on_a_frame_replicated_across_a_tubelet():
    video_enc = build_echofm("tiny", img_size=IMG, num_frames=2, tubelet=2)     # one tubelet in time
    frame_enc = to_frame_encoder(video_enc)
    assert (frame_enc.cfg.num_frames, frame_enc.cfg.tubelet) == (1, 1)
    frame = torch.rand(2, 3, 1, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(frame_enc.encode(frame), video_enc.encode(frame.repeat(1, 1, 2, 1, 1)),
                                   atol=1e-5, rtol=1e-5)


def test_frame_segmenter_takes_any_clip_length_and_selected_frames():
    model = EchoFMFrameSegmenter(to_frame_encoder(encoder()), n_classes=4).eval()
    v = video(t=5)
    with torch.no_grad():
        full = model(v)
        sel = torch.zeros(2, 5, dtype=torch.bool)
        sel[0, 1] = sel[1, 4] = True
        part = model(v, frames=sel)
    assert full.shape == (2, 4, 5, IMG, IMG) and part.shape == (2, 4, IMG, IMG)
    torch.testing.assert_close(part[1], full[1, :, 4], atol=1e-5, rtol=1e-4)
    assert model.predict(v).shape == (2, 5, IMG, IMG)
    with pytest.raises(ValueError, match="single-frame encoder"):
        EchoFMFrameSegmenter(encoder())


def test_multiview_fusion_ignores_absent_views_and_refuses_empty_studies():
    model = EchoFMMultiView(encoder(), fusion="attention").eval()
    with torch.no_grad():                                   # a non-trivial attention score
        model.score.weight.normal_(0, 1.0)
    vids = torch.rand(2, 4, 3, FRAMES, IMG, IMG)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    other = vids.clone()
    other[~mask] = torch.rand_like(other[~mask])            # change only the absent slots
    with torch.no_grad():
        out, out2 = model(vids, mask), model(other, mask)
        _, w = model.fuse(vids, mask)
    torch.testing.assert_close(out, out2)
    assert torch.all(w[~mask] == 0) and torch.allclose(w.sum(1), torch.ones(2))
    assert w[0, 0] != w[0, 2]                                # attention, not the plain mean
    torch.testing.assert_close(w[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    p = model.predict_proba(vids, mask)
    sev = model.predict(vids, mask)
    assert p.shape == (2, 2) and torch.allclose(p.sum(1), torch.ones(2))
    assert sev.shape == (2,) and bool(((sev >= 0) & (sev <= 4)).all())
    with pytest.raises(ValueError, match="no available view"):
        model(vids, torch.tensor([[True, False, False, False], [False] * 4]))


def test_mean_fusion_is_the_mean_of_the_present_views():
    model = EchoFMMultiView(encoder(), fusion="mean").eval()
    vids = torch.rand(1, 4, 3, FRAMES, IMG, IMG)
    mask = torch.tensor([[False, True, True, False]])
    with torch.no_grad():
        fused, w = model.fuse(vids, mask)
        per_view = model.pooled(vids[0, 1:3]) + model.view_embed[1:3]
    torch.testing.assert_close(fused[0], per_view.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w[0], torch.tensor([0.0, 0.5, 0.5, 0.0]))


@pytest.mark.parametrize("make", [lambda e: EchoFMClassifier(e, 3), lambda e: EchoFMMultiView(e)])
def test_layer_decay_groups_for_pooled_heads(make):
    model = make(encoder())
    depth = model.cfg.depth
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert all(lr_of[id(p)] == 1.0 for p in model.head.parameters())
    assert lr_of[id(model.encoder.blocks[depth - 1].mlp.fc1.weight)] == pytest.approx(0.5)
    assert lr_of[id(model.encoder.blocks[0].mlp.fc1.weight)] == pytest.approx(0.5 ** depth)
    assert lr_of[id(model.encoder.pos_embed_spatial)] == pytest.approx(0.5 ** (depth + 1))
    assert wd_of[id(model.head.fc.weight)] == 0.05 and wd_of[id(model.head.fc.bias)] == 0.0
    assert wd_of[id(model.encoder.pos_embed_spatial)] == 0.0
    if isinstance(model, EchoFMMultiView):
        assert wd_of[id(model.view_embed)] == 0.0 and lr_of[id(model.view_embed)] == 1.0
    unused = {id(p) for n, p in model.encoder.named_parameters() if n.startswith(("decoder", "projector", "mask"))}
    assert not unused & set(lr_of)                          # MAE decoder / projector never optimised
    model.set_frozen(True)
    frozen = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    assert {id(p) for g in frozen for p in g["params"]} == {id(p) for n, p in model.named_parameters()
                                                           if not n.startswith("encoder.")}


def test_frozen_encoder_is_bit_identical_after_training_and_gets_no_gradients():
    model = EchoFMClassifier(encoder(drop_path=0.1), 2, freeze_encoder=True)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.fc.weight.clone()
    opt = torch.optim.AdamW(param_groups(model, 1e-2, 0.05, 0.75))
    model.train()
    assert model.training and not model.encoder.training
    for step in range(3):
        loss = task_loss(model, "view", {"video": video(seed=step), "label": torch.tensor([0, 1])})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.head.fc.weight, head_before)


def test_full_mode_trains_the_encoder():
    model = EchoFMRegressor(encoder())
    before = model.encoder.blocks[0].attn.qkv.weight.clone()
    opt = torch.optim.AdamW(param_groups(model, 1e-2, 0.05, 0.75))
    loss = task_loss(model, "ef", {"video": video(), "ef": torch.tensor([40.0, 60.0])})
    loss.backward()
    opt.step()
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.weight, before)
