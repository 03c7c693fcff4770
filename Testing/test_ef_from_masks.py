"""Issue 5 acceptance: EF from *predicted* masks on held-out phantoms within 5 EF points (MAE).

A tiny EchoFM segmenter (untrained encoder, full fine-tuning) is trained once on phantom clips
labelled at ED/ES only, then segments every frame of held-out clips at the model size (48 px).
Volumes come from ``cardiac_measurements`` with the model pixel's spacing. Measuring the *true*
masks at 48 px already costs 1.6-1.9 EF points (MAE; LVs of 12-19 px). Measured: EF MAE 2.5 on
this held-out set, 3.3 over 60 held-out clips (docs/measurements.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from EchoFMEngine.cine import Cine
from EchoFMEngine.clinical.measure import cardiac_measurements
from EchoFMEngine.metrics import dice
from EchoFMEngine.models import build_echofm
from EchoFMEngine.clinical.phase import detect_ed_es, event_accuracy
from EchoFMEngine.training.data import phantom_clip
from EchoFMEngine.training.finetune import fit
from EchoFMEngine.training.segment import predict_items

IMG, FRAMES = 48, 8


def clips(n: int, seed: int) -> list[dict]:
    """Phantom clips at the model size spanning 1.1-1.4 beats, with their studies (the truth)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        video, study, tf = phantom_clip(("A4C", "A2C")[i % 2], FRAMES, IMG, float(rng.uniform(55, 95)),
                                        float(rng.uniform(1.1, 1.4)), ef=float(rng.uniform(30, 70)),
                                        seed=seed * 100 + i)
        labelled = np.isin(np.arange(FRAMES), np.concatenate([study.ed_frames, study.es_frames]))
        out.append({"video": video, "masks": torch.from_numpy(tf.to_model(study.masks)).long(),
                    "mask_valid": torch.from_numpy(labelled), "study": study,
                    "spacing_mm": tuple(s / tf.scale for s in study.cine.spacing_mm)})
    return out


@pytest.fixture(scope="module")
def predicted():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: a second thread costs more in sync than it gives
    try:
        torch.manual_seed(0)
        encoder = build_echofm("tiny", img_size=IMG, num_frames=FRAMES)
        # 30 clips, batch 1, 400 steps: the best of 12 settings at ~20-25 s of training (held-out
        # EF MAE 3.3-3.5 over 30 clips; 10 clips / 300 steps / batch 2 gave 5.0, 20 clips / 600 steps 3.4)
        model = fit(encoder, "segment", clips(30, seed=1), ["run.steps=400", "optim.lr=3e-3", "run.batch_size=1",
                                                             "data.augment=false", "optim.warmup_steps=5"])
        held_out = clips(20, seed=2)
        preds = [p.numpy().astype(np.uint8) for p in predict_items(model, held_out)]
    finally:
        torch.set_num_threads(threads)
    return held_out, preds


def test_ef_from_predicted_masks_within_5_points(predicted):
    held_out, preds = predicted
    lv_dice, errors = [], []
    for item, pred in zip(held_out, preds):
        st = item["study"]
        truth = item["masks"].numpy()
        lv_dice += [dice(pred[f] == 1, truth[f] == 1) for f in range(FRAMES)]
        m = cardiac_measurements(pred, item["spacing_mm"], st.ed_frames, st.es_frames,
                                 expected_shape=pred.shape)
        assert m["unit"] == "ml"
        vols = m["lv_volume"]
        edv = np.mean([vols[f] for f in st.ed_frames])  # the phantom's EF: mean EDV and mean ESV
        esv = np.mean([vols[f] for f in st.es_frames])
        errors.append((edv - esv) / edv * 100.0 - st.ef)
    assert np.mean(lv_dice) > 0.9
    assert np.mean(np.abs(errors)) <= 5.0, np.round(errors, 2)


def test_ed_es_from_predicted_masks(predicted):
    """detect_ed_es on the predicted label maps (no ECG, ~5 fps clips of 1.1-1.4 beats): every
    event it reports is a true one within a frame, and it finds the clips' inner ES frames."""
    held_out, preds = predicted
    found = total = 0
    for item, pred in zip(held_out, preds):
        st = item["study"]
        video = (item["video"].permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)
        ph = detect_ed_es(Cine(frames=video, fps=st.cine.fps), masks=pred)
        assert ph.method == "masks"
        for got, truth in ((ph.ed_frames, st.ed_frames), (ph.es_frames, st.es_frames)):
            assert event_accuracy(got, truth, 1)["false"] == 0, (got, list(truth))
        inner = [f for f in st.es_frames if 0 < f < FRAMES - 1]
        found += event_accuracy(ph.es_frames, inner, 1)["hits"]
        total += len(inner)
    assert found >= 0.8 * total
