"""The EchoFM-embedding heartbeat signal (issue 11): one value per frame from an encoder's frame
embeddings, periodic where the video is, and the analysis using it only when a models folder holds
an encoder."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from EchoFMEngine.analysis import analyze, pipeline
from EchoFMEngine.cine import Cine
from EchoFMEngine.clinical import phase as phase_module
from EchoFMEngine.analysis import phase_command
from EchoFMEngine.analysis.embedding_signal import (EMBEDDING_SIGNAL, embedding_signal, encoder_signals,
                                                    frame_embeddings, window_starts)
from EchoFMEngine.clinical.image_beats import blood_pool_signal, signal_period
from EchoFMEngine.clinical.phantoms import make_study
from EchoFMEngine.models import build_echofm
from EchoFMEngine.models.checkpoint import save_pretrained
from EchoFMEngine.models.registry import ModelStore

FPS = 30.0


def _encoder(seed: int = 0, tubelet: int = 4):
    torch.manual_seed(seed)
    return build_echofm("tiny", tubelet=tubelet).eval()      # 16 frames, 64 px: random weights


def _repeated_beat(period: int, seed: int, n_frames: int = 120) -> Cine:
    """One phantom beat of ``period`` frames repeated: a strictly periodic video (no ECG)."""
    st = make_study("A4C", n_frames=period, size=(96, 112), fps=FPS, heart_rate_bpm=60.0 * FPS / period,
                    ef=55, seed=seed)
    frames = np.concatenate([st.cine.frames] * int(np.ceil(n_frames / period)))[:n_frames]
    return Cine(frames=frames, fps=FPS)


@pytest.fixture(scope="module")
def encoder():
    return _encoder()


@pytest.mark.parametrize("period,seed,tubelet", [(20, 1, 4), (24, 2, 4), (24, 2, 2)])
def test_the_signal_repeats_with_the_beat_and_rises_with_the_blood_pool(one_torch_thread, period, seed, tubelet):
    """A deterministic encoder maps a periodic video to periodic embeddings; out of order, no period."""
    encoder = _encoder(tubelet=tubelet)
    cine = _repeated_beat(period, seed)
    v = embedding_signal(cine, encoder)
    assert v.shape == (cine.num_frames,)
    assert np.array_equal(v, embedding_signal(cine, encoder))          # deterministic
    found, quality = signal_period(v, FPS)
    assert found == pytest.approx(period, rel=0.1) and quality > 0.5
    assert np.corrcoef(v, blood_pool_signal(cine))[0, 1] > 0.5
    shuffled = dataclasses.replace(cine, frames=cine.frames[np.random.default_rng(0).permutation(cine.num_frames)])
    lost, _ = signal_period(embedding_signal(shuffled, encoder), FPS)
    assert lost is None or abs(lost / period - 1) > 0.1               # frames out of order: no heartbeat


def test_a_still_cine_gives_no_window_step_heartbeat(encoder, one_torch_thread):
    """The encoder's windows step about half a window; the slots' learned positions must not turn
    that step into a period (they are removed with the slots of a still clip)."""
    rng = np.random.default_rng(3)
    base = make_study("A4C", n_frames=2, size=(96, 112), fps=FPS, seed=4).cine.frames[0]
    noisy = np.clip(base[None].astype(np.int16) + rng.integers(-3, 4, (120,) + base.shape), 0, 255).astype(np.uint8)
    v = embedding_signal(Cine(frames=noisy, fps=FPS), encoder)
    step = np.diff(window_starts(120, encoder.cfg.num_frames, encoder.cfg.tubelet))[0]
    found, quality = signal_period(v, FPS)
    assert found is None or abs(found - step) > 1 or quality < 0.35
    flat = embedding_signal(Cine(frames=np.repeat(base[None], 40, axis=0), fps=FPS), encoder)
    assert np.ptp(flat) < 1e-9


def test_window_steps_stay_off_the_tubelet_grid_and_cover_the_cine():
    starts = window_starts(100, 16, 4)
    assert starts[0] == 0 and starts[-1] == 100 - 16 and np.diff(starts)[0] % 4
    assert window_starts(10, 16, 4) == [0]
    frames = make_study("A4C", n_frames=10, size=(64, 64), fps=FPS, seed=1).cine
    assert frame_embeddings(frames, _encoder()).shape == (10, 96)      # shorter than a window: last frame repeated


def test_a_task_models_encoder_serves_too(one_torch_thread):
    from EchoFMEngine.models.heads import EchoFMSegmenter

    cine = _repeated_beat(24, 2, 72)
    seg = EchoFMSegmenter(_encoder()).eval()
    assert np.allclose(embedding_signal(cine, seg), embedding_signal(cine, seg.encoder))
    with pytest.raises(TypeError, match="EchoFM encoder"):
        embedding_signal(cine, object())


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """A models folder holding only a pretrained (tiny, random) encoder, as `models download` leaves one."""
    root = tmp_path_factory.mktemp("encoder_models")
    saved = save_pretrained(_encoder(), root / "export")
    ModelStore(root / "models").import_encoder(saved / "model.safetensors", "tiny-test",
                                               {"source": "test", "licence": "none"})
    return root / "models"


def _spy(monkeypatch):
    seen = []
    real = phase_module.detect_ed_es

    def spy(cine, *a, **kw):
        seen.append(dict(kw.get("extra_signals") or {}))
        return real(cine, *a, **kw)

    monkeypatch.setattr(phase_module, "detect_ed_es", spy)
    monkeypatch.setattr(pipeline, "detect_ed_es", spy, raising=False)
    return seen


def test_the_analysis_offers_the_encoder_signal_only_when_the_folder_holds_an_encoder(
        encoder_folder, tmp_path, monkeypatch, one_torch_thread):
    cine = _repeated_beat(24, 2, 96)
    seen = _spy(monkeypatch)
    res = analyze(cine, models=encoder_folder, device="cpu")
    assert list(seen[0]) == [EMBEDDING_SIGNAL] and seen[0][EMBEDDING_SIGNAL].shape == (96,)
    assert res.provenance["ed_es_method"]["encoder_signal_from"] == "pretrained encoder tiny-test"
    assert res.phase["signal"] == res.provenance["ed_es_method"]["signal"] != ""
    seen.clear()
    bare = analyze(cine, models=tmp_path / "no_models", device="cpu")
    assert seen == [{}] and bare.provenance["ed_es_method"]["encoder_signal_from"] is None
    assert EMBEDDING_SIGNAL not in bare.phase["signal"]


def test_the_chosen_signal_is_recorded_when_the_encoder_signal_wins():
    """With a signal that repeats better than the images' own, the detector keeps it and names it."""
    cine = _repeated_beat(24, 2, 96)
    clean = np.tile(np.cos(2 * np.pi * np.arange(24) / 24), 4)          # an ideal volume curve, ED at 0
    ph = phase_module.detect_ed_es(cine, extra_signals={EMBEDDING_SIGNAL: clean})
    assert ph.signal_name == EMBEDDING_SIGNAL and ph.to_dict()["signal"] == EMBEDDING_SIGNAL
    assert encoder_signals(cine, None) == {}



def test_the_phase_command_offers_the_encoder_signal_from_a_models_folder(encoder_folder, tmp_path, monkeypatch,
                                                                        one_torch_thread, capsys):
    seen = []
    real = phase_command.detect_ed_es
    monkeypatch.setattr(phase_command, "detect_ed_es",
                        lambda cine, **kw: seen.append(dict(kw.get("extra_signals") or {})) or real(cine, **kw))
    path = tmp_path / "cine.npz"
    cine = _repeated_beat(24, 2, 96)
    np.savez(path, frames=cine.frames, fps=cine.fps)
    assert phase_command.cli([str(path), "--out", str(tmp_path / "a"), "--models", str(encoder_folder)]) == 0
    assert list(seen[0]) == [EMBEDDING_SIGNAL] and "pretrained encoder tiny-test" in capsys.readouterr().out
    seen.clear()
    assert phase_command.cli([str(path), "--out", str(tmp_path / "b")]) == 0
    assert seen == [{}]
