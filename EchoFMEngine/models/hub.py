"""The released EchoFM weights from the Hugging Face Hub, behind an explicit licence acceptance.

``python -m EchoFMEngine models download echofm-vitl [--revision REV] [--accept-license]`` is the
only code path that downloads anything. It goes through ``huggingface_hub.hf_hub_download``, so
the Hub cache, resume, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE``, proxies
and tokens behave as users of that library expect. The file is then checked (its SHA-256 against
the Hub's LFS ETag when the Hub gives one, our loader's strict key and shape report), converted to
our safetensors + JSON format and imported into the models folder as an encoder, with its source,
Hub revision, licence and both checksums recorded there (the converted file is re-checked at every
load by :class:`~EchoFMEngine.models.registry.ModelStore`).
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_official_checkpoint, save_pretrained
from .registry import ModelStore, sha256_of

RELEASES = {
    "echofm-vitl": {
        "repo_id": "sekeun/EchoFM",
        "filename": "echofm_vitl.pth",
        "description": "EchoFM ViT-L encoder pretrained on echocardiography videos (Kim et al.)",
        "licence": "CC-BY-NC-ND-4.0",
        "licence_url": "https://creativecommons.org/licenses/by-nc-nd/4.0/",
        "licence_text": ("The EchoFM weights are released under the Creative Commons Attribution-NonCommercial-"
                         "NoDerivatives 4.0 International licence (CC BY-NC-ND 4.0): non-commercial research use "
                         "only, with attribution to the authors; no commercial use; the weights may not be "
                         "redistributed in modified form. Models fine-tuned from them inherit these terms."),
    },
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class LicenceNotAccepted(RuntimeError):
    """The user did not accept the weights' licence: nothing was downloaded."""


class DownloadError(CheckpointError):
    """The download failed or the downloaded file was rejected; nothing was imported."""


def release(name: str) -> dict:
    """The release record of ``name`` (KeyError-free: a ValueError lists the known names)."""
    if name not in RELEASES:
        raise ValueError(f"unknown release {name!r}; known: {sorted(RELEASES)}")
    return RELEASES[name]


def licence_notice(name: str) -> str:
    r = release(name)
    return (f"{name}: {r['description']}\nSource: https://huggingface.co/{r['repo_id']} ({r['filename']})\n"
            f"Licence: {r['licence']} ({r['licence_url']})\n{r['licence_text']}")


def confirm_licence(name: str, accept: bool = False, ask: Optional[Callable[[str], str]] = None,
                    out=None) -> None:
    """Show the licence; return when accepted (``accept`` flag, or 'yes' typed at a prompt on a
    terminal), else raise :class:`LicenceNotAccepted`. No terminal and no flag -> refused."""
    out = out or sys.stderr
    print(licence_notice(name), file=out, flush=True)
    if accept:
        print("licence accepted (--accept-license)", file=out)
        return
    if ask is None:
        if not (sys.stdin and sys.stdin.isatty()):
            raise LicenceNotAccepted(f"{name}: licence {release(name)['licence']} not accepted (no terminal to ask "
                                     "on; pass --accept-license to accept it); nothing was downloaded")
        ask = input
    answer = ask("Accept this licence and download? [yes/no] ").strip().lower()
    if answer not in ("y", "yes"):
        raise LicenceNotAccepted(f"{name}: licence not accepted; nothing was downloaded")


def _hub_settings() -> dict:
    """Endpoint, cache and offline mode read from the environment now (huggingface_hub reads them
    once at import, which may predate a caller's change of ``HF_ENDPOINT`` or ``HF_HOME``)."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]).expanduser() / "hub") if env.get("HF_HOME")
                                        else None)
    offline = env.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return {"endpoint": env.get("HF_ENDPOINT") or None, "cache_dir": cache, "local_files_only": offline}


def _progress_class(progress: Optional[Callable[[int, Optional[int]], None]]):
    """A tqdm subclass that reports (bytes done, total) to ``progress`` (None: the default bar)."""
    if progress is None:
        return None

    class _Report(tqdm):
        def update(self, n=1):
            out = super().update(n)
            progress(int(self.n), int(self.total) if self.total else None)
            return out

    return _Report


def _discard_cached(path: Path) -> None:
    """Remove a rejected file from the Hub cache (its snapshot link and blob) so a retry refetches it."""
    blob = path.resolve()
    for p in {path, blob}:
        try:
            p.unlink()
        except OSError:
            pass


def fetch(name: str, revision: Optional[str] = None, progress=None) -> dict:
    """Download (or find in the Hub cache) the release file; returns path, commit, etag, sha256.

    A file whose SHA-256 differs from the Hub's LFS ETag is deleted from the cache and rejected."""
    # deferred: huggingface_hub reads HF_ENDPOINT / HF_HOME when imported, so it loads at download time
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # deferred: as above

    r = release(name)
    hub = _hub_settings()
    try:
        path = Path(hf_hub_download(r["repo_id"], r["filename"], revision=revision, tqdm_class=_progress_class(progress),
                                    **hub))
    except LocalEntryNotFoundError as e:
        raise DownloadError(f"{r['repo_id']}/{r['filename']}: not in the Hub cache and downloads are off "
                            f"(HF_HUB_OFFLINE) or the Hub is unreachable: {e}") from None
    except (HfHubHTTPError, OSError) as e:
        raise DownloadError(f"{r['repo_id']}/{r['filename']}: download failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the client raises several kinds (size checks, metadata errors)
        raise DownloadError(f"{r['repo_id']}/{r['filename']}: download failed: {type(e).__name__}: {e}") from None
    blob = path.resolve()
    etag = blob.name                       # the cache stores blobs under their ETag
    commit = path.parent.name              # .../snapshots/<commit>/<file>
    digest = sha256_of(path)
    if _SHA256.match(etag) and digest != etag:
        _discard_cached(path)
        raise DownloadError(f"{path}: SHA-256 {digest[:12]}... differs from the Hub's {etag[:12]}... (corrupt or "
                            "truncated download); removed from the cache, nothing imported")
    return {"path": path, "commit": commit, "etag": etag, "sha256": digest}


def download(name: str = "echofm-vitl", revision: Optional[str] = None, folder: Union[str, Path, None] = None,
             accept_license: bool = False, ask=None, progress=None, out=None) -> dict:
    """Licence -> download -> check -> convert -> import; returns the models-folder entry.

    Raises :class:`LicenceNotAccepted` (nothing downloaded) or :class:`DownloadError` /
    :class:`CheckpointError` (nothing imported)."""
    out = out or sys.stderr
    r = release(name)
    confirm_licence(name, accept_license, ask, out)
    got = fetch(name, revision, progress)
    try:
        model = load_official_checkpoint(got["path"], strict=True)
    except CheckpointError as e:
        _discard_cached(got["path"])
        raise DownloadError(f"rejected: {e}; removed from the cache, nothing imported") from None
    report = model.load_report
    print(f"checked {got['path'].name}: {len(model.state_dict())} tensors, no missing or unexpected keys"
          + (f" ({'; '.join(report['notes'])})" if report["notes"] else ""), file=out)
    provenance = {"source": f"hf://{r['repo_id']}/{r['filename']}", "revision": got["commit"],
                  "licence": r["licence"], "licence_url": r["licence_url"], "source_sha256": got["sha256"],
                  "requested_revision": revision or "main"}
    store = ModelStore(folder)
    with tempfile.TemporaryDirectory(prefix="echofm-convert-") as tmp:
        save_pretrained(model, tmp, metadata={"name": name, **provenance, "load_notes": report["notes"]})
        entry = store.import_encoder(Path(tmp) / "model.safetensors", name, provenance)
    print(f"imported encoder {name}: {store.folder / entry['file']} (revision {got['commit'][:12]}, "
          f"sha256 {entry['sha256'][:12]}...)", file=out)
    return entry


def progress_printer(label: str, out=None):
    """A progress callback printing ``PROGRESS k/n label`` lines (KiB, each new percent) that the
    Slicer module's background runner reads."""
    out = out or sys.stdout
    last = [-1]

    def report(done: int, total: Optional[int]) -> None:
        if not total:
            return
        pct = int(100 * done / total)
        if pct != last[0]:
            last[0] = pct
            print(f"PROGRESS {done >> 10}/{max(1, total >> 10)} {label} (KiB)", file=out, flush=True)

    return report
