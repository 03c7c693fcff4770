"""`models download`: the real huggingface_hub client against a loopback server that serves the
Hub's resolve endpoint, a pre-filled Hub cache with HF_HUB_OFFLINE=1, licence refusal, rejected
downloads, checksums at load, and `init_from: models:echofm-vitl` in a fine-tuning config."""
from __future__ import annotations

import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from EchoFMEngine.bench.reference import ReferenceEchoFM
from EchoFMEngine.models import CheckpointError, load_official_checkpoint, load_pretrained
from EchoFMEngine.models import cli as models_cli
from EchoFMEngine.models import hub, registry
from EchoFMEngine.models.registry import ModelStore

REPO, FILE = "sekeun/EchoFM", "echofm_vitl.pth"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# tiny released-layout model shaped as Resources/configs/finetune_view.yaml's encoder
TINY = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64,
            decoder_depth=2, decoder_num_heads=2, num_frames=8, t_patch_size=2)


@pytest.fixture(scope="module")
def released() -> bytes:
    torch.manual_seed(0)
    ref = ReferenceEchoFM(**TINY)
    buf = io.BytesIO()
    torch.save({"model": ref.state_dict(), "model_args": ref.model_args()}, buf)
    return buf.getvalue()


class FakeHub:
    """A loopback HTTP server answering HEAD/GET /{repo}/resolve/{revision}/{file} as the Hub does
    (X-Repo-Commit, ETag = the file's SHA-256 as for LFS files, Content-Length)."""

    def __init__(self, body: bytes):
        self.body, self.etag, self.send = body, hashlib.sha256(body).hexdigest(), body
        self.requests: list = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, with_body: bool):
                hub_.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 5 or "/".join(parts[:2]) != REPO or parts[2] != "resolve" or parts[4] != FILE:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub_.etag}"')
                self.send_header("Content-Length", str(len(hub_.body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if with_body:
                    self.wfile.write(hub_.send)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)   # a free loopback port
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(released, tmp_path, monkeypatch):
    server = FakeHub(released)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("ECHOFM_MODELS", str(tmp_path / "models"))
    yield server
    server.close()


def _state(model) -> dict:
    return {k: v for k, v in model.state_dict().items()}


def test_download_checks_converts_and_records_provenance(fake_hub, released, tmp_path, capsys):
    entry = hub.download("echofm-vitl", accept_license=True)
    assert ("GET", f"/{REPO}/resolve/main/{FILE}") in fake_hub.requests
    store = ModelStore()
    rec = store.encoders()["echofm-vitl"]
    assert rec == entry
    assert rec["source"] == f"hf://{REPO}/{FILE}" and rec["revision"] == COMMIT
    assert rec["licence"] == "CC-BY-NC-ND-4.0"
    assert rec["source_sha256"] == hashlib.sha256(released).hexdigest()
    path = store.get_encoder("echofm-vitl")
    assert rec["sha256"] == registry.sha256_of(path)
    assert "CC BY-NC-ND 4.0" in capsys.readouterr().err
    # the imported safetensors encoder equals the released file read by our loader
    (tmp_path / "released.pth").write_bytes(released)
    ref = load_official_checkpoint(tmp_path / "released.pth", strict=True)
    got = load_pretrained(path)
    assert got.metadata["revision"] == COMMIT
    a, b = _state(ref), _state(got)
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    # `models list` shows source, revision and licence
    assert models_cli.cli(["list"]) == 0
    out = capsys.readouterr().out
    assert "echofm-vitl" in out and COMMIT in out and "CC-BY-NC-ND-4.0" in out and f"hf://{REPO}" in out


def test_revision_is_passed_to_the_hub(fake_hub):
    hub.download("echofm-vitl", revision="v1.0", accept_license=True)
    assert ("GET", f"/{REPO}/resolve/v1.0/{FILE}") in fake_hub.requests
    assert ModelStore().encoders()["echofm-vitl"]["requested_revision"] == "v1.0"


def test_refused_licence_downloads_nothing(fake_hub, tmp_path, capsys):
    # no terminal on stdin and no flag: refused (pytest's stdin is not a tty)
    assert models_cli.cli(["download", "echofm-vitl"]) == 2
    assert "not accepted" in capsys.readouterr().err
    with pytest.raises(hub.LicenceNotAccepted):
        hub.download("echofm-vitl", ask=lambda prompt: "no")
    assert fake_hub.requests == []
    assert not (tmp_path / "hf").exists() and not (tmp_path / "models").exists()


def test_prompt_acceptance_downloads(fake_hub):
    hub.download("echofm-vitl", ask=lambda prompt: "yes")
    assert "echofm-vitl" in ModelStore().encoders()


def test_prefilled_cache_works_offline(fake_hub, tmp_path, monkeypatch):
    hub.download("echofm-vitl", accept_license=True)            # fills the Hub cache under HF_HOME
    fake_hub.close()
    n = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ECHOFM_MODELS", str(tmp_path / "models2"))
    entry = hub.download("echofm-vitl", accept_license=True)
    assert entry["revision"] == COMMIT and len(fake_hub.requests) == n
    # offline with an empty cache: a clear error, nothing imported
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("ECHOFM_MODELS", str(tmp_path / "models3"))
    with pytest.raises(hub.DownloadError, match="HF_HUB_OFFLINE"):
        hub.download("echofm-vitl", accept_license=True)
    assert ModelStore().encoders() == {}


def test_corrupt_download_is_rejected_and_removed(fake_hub, released, tmp_path):
    bad = bytearray(released)
    bad[len(bad) // 2] ^= 0xFF                       # same size, one byte flipped: SHA-256 != ETag
    fake_hub.send = bytes(bad)
    with pytest.raises(hub.DownloadError, match="SHA-256"):
        hub.download("echofm-vitl", accept_license=True)
    assert ModelStore().encoders() == {} and not (tmp_path / "models" / "manifest.json").exists()
    assert not list((tmp_path / "hf").rglob(FILE))   # the bad file left the cache
    fake_hub.send = released                         # a retry fetches it again and succeeds
    assert hub.download("echofm-vitl", accept_license=True)["revision"] == COMMIT


def test_truncated_file_is_rejected_by_the_loader(fake_hub, released, tmp_path):
    cut = released[: len(released) // 2]
    fake_hub.body = fake_hub.send = cut
    fake_hub.etag = "1" * 40                          # a non-LFS ETag: only the loader can tell
    with pytest.raises(hub.DownloadError, match="rejected"):
        hub.download("echofm-vitl", accept_license=True)
    assert ModelStore().encoders() == {}
    assert not list((tmp_path / "models").glob("*.safetensors")) if (tmp_path / "models").exists() else True


def test_short_body_is_rejected(fake_hub, released, tmp_path):
    fake_hub.send = released[: len(released) // 3]    # Content-Length promises more than arrives
    with pytest.raises(hub.DownloadError):
        hub.download("echofm-vitl", accept_license=True)
    assert ModelStore().encoders() == {}


def test_swapped_file_fails_its_checksum_at_load(fake_hub):
    hub.download("echofm-vitl", accept_license=True)
    path = ModelStore().get_encoder("echofm-vitl")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ModelStore().get_encoder("echofm-vitl")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        registry.resolve_ref("models:echofm-vitl")


def test_finetune_config_starts_from_the_imported_encoder(fake_hub, tmp_path):
    from EchoFMEngine.training import finetune
    from EchoFMEngine.training.config import load_config

    hub.download("echofm-vitl", accept_license=True)
    imported = load_pretrained(ModelStore().get_encoder("echofm-vitl"))
    quick = ["run.steps=2", "run.eval_every=2", "run.ckpt_every=2", "run.batch_size=2", "data.n_train=2",
             "data.n_val=1", "data.n_test=1", "head.mode=frozen"]
    cfg = load_config(finetune.CONFIGS / "finetune_view.yaml",
                      ["init_from=models:echofm-vitl", f"run.out={tmp_path / 'run'}", *quick])
    assert Path(cfg["init_from"]) == ModelStore().get_encoder("echofm-vitl")
    encoder = finetune.build_encoder(cfg)
    a, b = _state(imported), _state(encoder)
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    # a frozen run keeps exactly those weights in its task model
    finetune.run(cfg, progress=False)
    from EchoFMEngine.models.task_checkpoint import load_task_model

    model = load_task_model(tmp_path / "run" / "model", task="view")
    for k, v in model.encoder.state_dict().items():
        if not k.startswith(("decoder", "projector", "mask_token")):
            assert torch.equal(v, a[k]), k


def test_unknown_reference_is_named(fake_hub):
    with pytest.raises(CheckpointError, match="models download"):
        registry.resolve_ref("models:echofm-vitl")


def test_task_imports_keep_the_encoder_entry(fake_hub, tmp_path):
    from EchoFMEngine.models.heads import EchoFMClassifier
    from EchoFMEngine.models.task_checkpoint import save_task_model

    hub.download("echofm-vitl", accept_license=True)
    enc = load_pretrained(ModelStore().get_encoder("echofm-vitl"))
    desc = {"task": "view", "labels": ["A2C", "A4C"], "trained_on": "phantom", "preprocessing": {},
            "input": {"frames": 8, "height": 32, "width": 32, "channels": 3, "value_range": [0, 1],
                      "layout": "[B, C, T, H, W]"}}
    folder = save_task_model(EchoFMClassifier(enc, 2), tmp_path / "view", desc)
    store = ModelStore()
    store.import_file(folder, "view")
    assert store.get("view") is not None and "echofm-vitl" in store.encoders()
    assert Path(registry.resolve_ref("models:view")) == store.get("view")


def test_slicer_download_runs_in_the_background_with_progress(fake_hub, tmp_path):
    import subprocess

    from EchoFMSlicer.EchoFMSlicerLib.logic import EchoFMLogic
    from EchoFMSlicer.EchoFMSlicerLib.runner import parse_progress

    assert "CC-BY-NC-ND-4.0" in EchoFMLogic.released_weights_notice()
    with pytest.raises(ValueError, match="not accepted"):
        EchoFMLogic.download_weights_command(tmp_path / "m", accepted=False)
    cmd = EchoFMLogic.download_weights_command(tmp_path / "m", accepted=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    events = [e for e in map(parse_progress, proc.stdout.splitlines()) if e is not None]
    assert events and events[-1].fraction == pytest.approx(1.0, abs=0.05)
    assert "hf://sekeun/EchoFM" in EchoFMLogic.encoder_status(tmp_path / "m")
