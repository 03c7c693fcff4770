"""The local models folder: which fine-tuned weights file serves which task, with checksums.

Layout::

    <folder>/manifest.json            {"tasks": {task: {file, sha256, labels, input, preprocessing, ...}},
                                       "encoders": {name: {file, sha256, source, revision, licence, ...}}}
    <folder>/<task>-<sha12>.safetensors
    <folder>/encoder-<name>-<sha12>.safetensors

The folder is ``$ECHOFM_MODELS`` or ``~/.echofm/models``. Task files enter through
:meth:`ModelStore.import_file` (``python -m EchoFMEngine models import FILE --task T``); the released
encoder only through ``models download`` (:mod:`.hub`, after licence acceptance), never implicitly.
Every :meth:`ModelStore.get` / :meth:`ModelStore.get_encoder` checks the file against its recorded
SHA-256 once per process.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

from ..tasks import TASK_NAMES as TASKS
from ..tasks import TASKS as _SPECS
from .files import CheckpointError, weights_file

TASK_HELP = {t.name: t.title for t in _SPECS}
ENV_VAR = "ECHOFM_MODELS"
MANIFEST = "manifest.json"


def default_folder() -> Path:
    """``$ECHOFM_MODELS`` when set, else ``~/.echofm/models`` (never inside an application install)."""
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".echofm" / "models"


def sha256_of(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class ModelStore:
    """A models folder and its manifest. A missing folder is an empty store, not an error."""

    def __init__(self, folder: Union[str, Path, None] = None):
        self.folder = Path(folder).expanduser() if folder is not None else default_folder()
        self._verified: set = set()

    # ------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def _manifest(self):
        """The parsed manifest (None when the folder or manifest is absent)."""
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.manifest_path}: unreadable manifest: {e}") from None

    def entries(self) -> dict:
        """``{task: entry}`` from the manifest (empty when the folder or manifest is absent)."""
        data = self._manifest()
        if data is None:
            return {}
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if not isinstance(tasks, dict):
            raise CheckpointError(f"{self.manifest_path}: manifest has no 'tasks' mapping")
        return tasks

    def _write(self, tasks: dict, encoders: Optional[dict] = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        encoders = self.encoders() if encoders is None else encoders
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"format": "echofm-models-v1", "tasks": tasks, "encoders": encoders},
                                  indent=2, sort_keys=True))
        tmp.replace(self.manifest_path)

    # ------------------------------------------------------------------ encoders (released weights)
    def encoders(self) -> dict:
        """``{name: entry}`` of pretrained encoders (e.g. ``echofm-vitl`` from ``models download``)."""
        data = self._manifest()
        enc = data.get("encoders", {}) if isinstance(data, dict) else {}
        return enc if isinstance(enc, dict) else {}

    def import_encoder(self, path: Union[str, Path], name: str, provenance: dict) -> dict:
        """Copy an encoder file (our safetensors format) in under ``name`` with its provenance
        (source, revision, licence, source_sha256) and its own SHA-256."""
        # deferred: checkpoint loads torch; the models folder does without it
        from .checkpoint import read_pretrained_header

        src = weights_file(Path(path).expanduser())
        read_pretrained_header(src)                       # refuses anything but our encoder format
        digest = sha256_of(src)
        fname = f"encoder-{name}-{digest[:12]}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        dst = self.folder / fname
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        encoders = self.encoders()
        old = encoders.get(name)
        entry = {**provenance, "file": fname, "sha256": digest,
                 "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        encoders[name] = entry
        self._write(self.entries(), encoders)
        if old and old.get("file") != fname:
            (self.folder / old["file"]).unlink(missing_ok=True)
        self._verified.add(dst)
        return entry

    def _inside(self, name) -> Path:
        """A manifest entry's file, refused unless it names a file inside the models folder
        (an entry like ``../../etc/passwd`` or an absolute path is never read)."""
        if not isinstance(name, str) or not name or Path(name).is_absolute():
            raise CheckpointError(f"{self.manifest_path}: entry file {name!r} must be a name inside {self.folder}")
        root = self.folder.resolve()
        path = (self.folder / name).resolve()
        if root not in path.parents:
            raise CheckpointError(f"{self.manifest_path}: entry file {name!r} points outside the models folder "
                                  f"{self.folder}; refused")
        return self.folder / name

    def get_encoder(self, name: str, verify: bool = True) -> Path:
        """Path of encoder ``name``, checked against its recorded SHA-256; CheckpointError when absent."""
        entry = self.encoders().get(name)
        if entry is None:
            raise CheckpointError(f"no encoder {name!r} in {self.folder} (have {sorted(self.encoders())}); get the "
                                  f"released one with `python -m EchoFMEngine models download {name}`")
        return self._checked(entry, f"encoder {name!r}", "download it again", verify)

    def _checked(self, entry: dict, what: str, fix: str, verify: bool) -> Path:
        """The entry's file inside the folder, present and (``verify``) matching its SHA-256."""
        path = self._inside(entry.get("file"))
        if not path.is_file():
            raise CheckpointError(f"{path}: listed as {what} in {self.manifest_path} but missing")
        if verify and path not in self._verified:
            digest = sha256_of(path)
            if digest != entry.get("sha256"):
                raise CheckpointError(f"{path}: checksum mismatch for {what} (manifest "
                                      f"{str(entry.get('sha256'))[:12]}..., file {digest[:12]}...); {fix}")
            self._verified.add(path)
        return path

    # ------------------------------------------------------------------ queries
    def get(self, task: str, verify: bool = True) -> Optional[Path]:
        """Path of the weights file for ``task``, or None when the store has none.

        A listed file that is missing or whose SHA-256 differs from the manifest raises
        :class:`CheckpointError` (a corrupted or swapped file is never used silently)."""
        entry = self.entries().get(task)
        if entry is None:
            return None
        return self._checked(entry, f"task {task!r}", "re-import it", verify)

    def missing(self, tasks: Sequence[str] = TASKS) -> dict:
        """``{task: why}`` for each task without weights in this store."""
        have = self.entries()
        return {t: f"no fine-tuned '{t}' model ({TASK_HELP.get(t, t)}) in {self.folder}; add one with "
                   f"`{self.import_command(t)}`"
                for t in tasks if t not in have}

    def import_command(self, task: str, file: str = "FILE") -> str:
        """The exact shell command that imports ``file`` for ``task`` into this folder."""
        return (f"python -m EchoFMEngine models import {file} --task {task} "
                f"--folder {shlex.quote(str(self.folder))}")

    # ------------------------------------------------------------------ import
    def import_file(self, path: Union[str, Path], task: Optional[str] = None) -> dict:
        """Copy a fine-tuned checkpoint into the store for its task and record its checksum.

        ``task`` must agree with the task the checkpoint describes (a segmenter cannot serve
        view identification); when omitted, the checkpoint's own task is used."""
        # deferred: task_checkpoint loads torch, as above
        from .task_checkpoint import read_task_description, validate_task_file

        src = weights_file(Path(path).expanduser())
        desc = read_task_description(src)
        validate_task_file(src, desc)        # task, head, labels and tensor shapes agree, before anything is built
        own = desc.get("task")
        if own not in TASKS:
            raise CheckpointError(f"{src}: describes task {own!r}, not one of {list(TASKS)}")
        if task is not None and task != own:
            raise CheckpointError(f"{src}: is a {own!r} checkpoint, cannot be imported as task {task!r}")
        digest = sha256_of(src)
        name = f"{own}-{digest[:12]}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        dst = self.folder / name
        if not dst.is_file() or sha256_of(dst) != digest:
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
        tasks = self.entries()
        old = tasks.get(own)
        entry = {"file": name, "sha256": digest, "source_name": src.name if src.name != "model.safetensors"
                 else src.parent.name,
                 "labels": desc.get("labels"), "input": desc.get("input"),
                 "preprocessing": desc.get("preprocessing"), "format": desc.get("format"),
                 "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        tasks[own] = entry
        self._write(tasks)
        if old and old["file"] != name and not any(e["file"] == old["file"] for e in tasks.values()):
            (self.folder / old["file"]).unlink(missing_ok=True)
        self._verified.add(dst)
        return {"task": own, **entry}


def resolve_ref(value, folder: Union[str, Path, None] = None):
    """``models:NAME`` -> the checked path of encoder (or task) NAME in the models folder; other values
    unchanged. Lets configs say ``init_from: models:echofm-vitl``."""
    if not (isinstance(value, str) and value.startswith("models:")):
        return value
    name = value[len("models:"):].strip()
    store = ModelStore(folder)
    if name in TASKS and name not in store.encoders():
        path = store.get(name)
        if path is None:
            raise CheckpointError(f"{value}: no {name!r} model in {store.folder}")
        return str(path)
    return str(store.get_encoder(name))
