"""Augmentations: identity at zero, frames and masks move together, erasing spares masks, seeds repeat."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from EchoFMEngine.data import augment as A


def _item(t=4, h=48, w=64, fill=0.0):
    video = torch.full((3, t, h, w), fill)
    masks = torch.zeros((t, h, w), dtype=torch.long)
    return {"video": video, "masks": masks, "mask_valid": torch.ones(t, dtype=torch.bool), "ef": 55.0}


def _centroid(x: torch.Tensor) -> tuple[float, float]:
    """(row, col) centroid of a non-negative 2D map."""
    x = x.double()
    rows, cols = torch.meshgrid(torch.arange(x.shape[0]), torch.arange(x.shape[1]), indexing="ij")
    total = x.sum()
    assert total > 0, "nothing left in the image"
    return float((rows * x).sum() / total), float((cols * x).sum() / total)


def test_zero_parameters_are_identity():
    torch.manual_seed(0)
    item = _item()
    item["video"] = torch.rand(3, 4, 48, 64)
    item["masks"] = torch.randint(0, 4, (4, 48, 64))
    theta = A.affine_theta(0.0, (0.0, 0.0), 1.0, (48, 64))
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), atol=1e-7)
    # The resampling path itself reproduces the input with the identity matrix.
    assert torch.allclose(A._warp(item["video"], theta, "bilinear"), item["video"], atol=1e-5)
    assert torch.equal(A._warp(item["masks"], theta, "nearest"), item["masks"])
    out = A.RandomAffine(degrees=0.0, translate=0.0, scale=(1.0, 1.0), generator=1)(item)
    assert torch.allclose(out["video"], item["video"], atol=1e-5)
    assert torch.equal(out["masks"], item["masks"])
    assert out["ef"] == 55.0 and torch.equal(out["mask_valid"], item["mask_valid"])
    for t in (A.RandomErasing(p=0.0, generator=1), A.RandomHorizontalFlip(p=0.0, generator=1)):
        out = t(item)
        assert torch.equal(out["video"], item["video"]) and torch.equal(out["masks"], item["masks"])


@pytest.mark.parametrize("angle,translate,scale", [(90.0, (0.0, 0.0), 1.0), (30.0, (0.1, -0.05), 1.2),
                                                   (-15.0, (-0.1, 0.1), 0.9)])
def test_bright_pixel_and_mask_move_to_the_same_place(angle, translate, scale):
    h, w = 64, 80
    item = _item(t=3, h=h, w=w)
    r, c = 30, 52  # right of centre, slightly above the middle row
    item["video"][:, :, r - 1:r + 2, c - 1:c + 2] = 1.0
    item["masks"][:, r - 1:r + 2, c - 1:c + 2] = 3
    out = A.affine(item, angle, translate, scale)
    # Expected: offset from centre p -> scale * R p + t, R counter-clockwise on screen (y down).
    px, py = c + 0.5 - w / 2, r + 0.5 - h / 2
    a = math.radians(angle)
    qx = scale * (math.cos(a) * px + math.sin(a) * py) + translate[0] * w
    qy = scale * (-math.sin(a) * px + math.cos(a) * py) + translate[1] * h
    exp_r, exp_c = qy + h / 2 - 0.5, qx + w / 2 - 0.5
    for t in range(3):
        vr, vc = _centroid(out["video"][0, t])
        mr, mc = _centroid((out["masks"][t] == 3).float())
        assert abs(vr - exp_r) < 1.0 and abs(vc - exp_c) < 1.0, (vr, vc, exp_r, exp_c)
        assert abs(mr - vr) < 1.0 and abs(mc - vc) < 1.0
        assert set(out["masks"][t].unique().tolist()) <= {0, 3}  # nearest: no new labels
    if angle == 90.0:  # a point right of the centre ends up above it
        assert exp_r < h / 2 - 10 and abs(exp_c - (w / 2 - 0.5)) < 2


def test_erasing_blanks_one_box_in_every_frame_and_spares_masks():
    item = _item(t=5, h=40, w=40, fill=1.0)
    item["masks"][:, 10:30, 10:30] = 1
    before = item["masks"].clone()
    out = A.RandomErasing(size=16, p=1.0, generator=3)(item)
    assert torch.equal(out["masks"], before)
    assert torch.equal(item["video"], torch.ones_like(item["video"]))  # input not modified in place
    zero = out["video"] == 0
    assert int(zero.sum()) == 3 * 5 * 16 * 16
    assert torch.equal(zero[0, 0], zero[2, 4])  # same box in every frame and channel
    rows = zero[0, 0].any(dim=1).nonzero().flatten()
    cols = zero[0, 0].any(dim=0).nonzero().flatten()
    assert rows.numel() == 16 and cols.numel() == 16


def test_flip_moves_masks_with_frames_and_twice_is_identity():
    item = _item(t=2, h=20, w=30)
    item["video"][:, :, 5, 3] = 1.0
    item["masks"][:, 5, 3] = 2
    out = A.hflip(item)
    assert out["video"][0, 0, 5, 26] == 1.0 and out["masks"][1, 5, 26] == 2
    back = A.hflip(out)
    assert torch.equal(back["video"], item["video"]) and torch.equal(back["masks"], item["masks"])


def test_seeded_presets_repeat_and_differ_between_seeds():
    torch.manual_seed(0)
    item = _item(t=3, h=56, w=56)
    item["video"] = torch.rand(3, 3, 56, 56)
    item["masks"] = torch.randint(0, 4, (3, 56, 56))
    a = A.segmentation_augment(generator=123, erase_p=1.0)(item)
    b = A.segmentation_augment(generator=123, erase_p=1.0)(item)
    c = A.segmentation_augment(generator=124, erase_p=1.0)(item)
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["masks"], b["masks"])
    assert not torch.equal(a["video"], c["video"])
    n1 = A.segmentation_augment(generator=np.random.default_rng(5))(item)
    n2 = A.segmentation_augment(generator=np.random.default_rng(5))(item)
    assert torch.equal(n1["video"], n2["video"])
    flips = [bool(torch.equal(A.classification_augment(generator=s)(item)["video"], item["video"]))
             for s in range(40)]
    assert 5 < sum(flips) < 35  # about half are flipped


def test_sampled_parameters_stay_in_the_paper_ranges():
    t = A.RandomAffine(generator=7)
    prms = [t.sample() for _ in range(300)]
    angles = [p.angle_deg for p in prms]
    scales = [p.scale for p in prms]
    shifts = [abs(v) for p in prms for v in p.translate]
    assert -15 <= min(angles) < -10 and 10 < max(angles) <= 15
    assert 0.9 <= min(scales) < 0.95 and 1.35 < max(scales) <= 1.4
    assert max(shifts) <= 0.10
    with pytest.raises(ValueError):
        A.RandomAffine(scale=(1.2, 1.0))
    with pytest.raises(ValueError):
        A.build_augment("colour")


def test_phantom_masks_stay_on_their_anatomy_after_augmentation():
    from EchoFMEngine.clinical.phantoms import make_study

    st = make_study(view="A4C", n_frames=6, size=(96, 96), seed=4, with_ecg=False, overlay=False)
    video = torch.from_numpy(st.cine.frames).permute(3, 0, 1, 2).float() / 255.0
    item = {"video": video, "masks": torch.from_numpy(st.masks.astype(np.int64))}

    def means(it):
        grey = it["video"].mean(dim=0)
        return float(grey[it["masks"] == 1].mean()), float(grey[it["masks"] == 2].mean())

    cav0, myo0 = means(item)
    assert cav0 < 0.25 and myo0 > 0.45  # dark cavity, bright wall
    aug = A.RandomAffine(generator=11)
    for _ in range(4):
        prm = aug.sample()
        out = A.affine(item, prm.angle_deg, prm.translate, prm.scale)
        cav, myo = means(out)
        assert cav < cav0 + 0.08 and myo > myo0 - 0.12, (prm, cav, myo)
    # Control: masks moved differently from the frames no longer sit on the wall.
    moved = A.affine(item, 0.0, (0.1, 0.1), 1.0)
    wrong = {"video": moved["video"], "masks": A.affine(item, -15.0, (-0.1, 0.0), 1.3)["masks"]}
    assert means(wrong)[1] < myo0 - 0.2
