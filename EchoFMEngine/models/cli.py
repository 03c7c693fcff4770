"""`python -m EchoFMEngine models`: list, import, verify and download the models folder's weights.

The command line sits above the models folder (:mod:`.registry`) and the Hub download (:mod:`.hub`), so
neither imports the other's front end."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .files import CheckpointError
from .provenance import store_provenance
from .registry import ENV_VAR, TASKS, ModelStore


def cli(argv: Sequence[str]) -> int:
    """`python -m EchoFMEngine models COMMAND`: exit status 0 done, 1 error, 2 licence refused or bad arguments."""
    raw = argparse.RawDescriptionHelpFormatter
    folder_help = f"models folder (default ${ENV_VAR} or ~/.echofm/models); --models is the same option"
    demo = "runs/demo/models"  # the folder `python train.py` (the demo) fills
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine models", formatter_class=raw,
                                 description="The local models folder: which fine-tuned weights file serves "
                                             "which task, with SHA-256 checksums (downloads only through `download`).",
                                 epilog=f"example (after `python train.py`):\n"
                                        f"  python -m EchoFMEngine models list --folder {demo}")
    ap.add_argument("--folder", "--models", dest="folder", default=None, help=folder_help)
    sub = ap.add_subparsers(dest="cmd", required=True, title="commands")
    sub.add_parser("list", help="tasks, files and checksums in the folder", formatter_class=raw,
                   description="List the task -> weights file entries of the models folder.",
                   epilog=f"example:\n  python -m EchoFMEngine models list --folder {demo}")
    imp = sub.add_parser("import", help="add a local fine-tuned weights file for a task", formatter_class=raw,
                         description="Copy a fine-tuned checkpoint (a folder written by fine-tuning, or its "
                                     ".safetensors file) into the models folder for its task.",
                         epilog=f"example (after `python train.py`):\n  python -m EchoFMEngine models import "
                                f"runs/demo/segment/model --task segment --folder {demo}")
    imp.add_argument("file", help="checkpoint folder (e.g. runs/finetune_segment/model) or .safetensors file")
    imp.add_argument("--task", choices=TASKS, default=None,
                     help="task to serve; must match the checkpoint's own task (default: the checkpoint's)")
    sub.add_parser("verify", help="check every file against its recorded SHA-256", formatter_class=raw,
                   description="Check every listed weights file against its recorded SHA-256.",
                   epilog=f"example:\n  python -m EchoFMEngine models verify --folder {demo}")
    dl = sub.add_parser("download", help="the released EchoFM weights from the Hugging Face Hub (after licence "
                                         "acceptance)", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Show the licence, download through huggingface_hub once accepted, check, "
                                    "convert to safetensors and import as an encoder.",
                        epilog="example:\n  python -m EchoFMEngine models download echofm-vitl --accept-license")
    dl.add_argument("name", choices=["echofm-vitl"], help="release to download")
    dl.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit; default main)")
    dl.add_argument("--accept-license", action="store_true",
                    help="accept the licence (CC-BY-NC-ND 4.0, non-commercial research only) without a prompt")
    dl.add_argument("--folder", "--models", dest="folder", default=argparse.SUPPRESS,
                    help=f"models folder to import into (default ${ENV_VAR} or ~/.echofm/models)")
    for p in sub.choices.values():  # the shared option also after the subcommand: `models import F --folder D`
        if "--folder" not in p._option_string_actions:
            p.add_argument("--folder", "--models", dest="folder", default=argparse.SUPPRESS, help=folder_help)
    a = ap.parse_args(list(argv))
    if a.cmd == "download":
        return _download(a)
    store = ModelStore(a.folder)
    try:
        if a.cmd == "import":
            e = store.import_file(a.file, a.task)
            print(f"imported {e['task']}: {store.folder / e['file']} (sha256 {e['sha256'][:12]}...)")
        elif a.cmd == "list":
            entries = store.entries()
            prov = store_provenance(store)       # the same provenance every analysis result carries
            print(f"models folder: {store.folder}")
            for t in TASKS:
                e = entries.get(t)
                print(f"  {t:<8} " + (f"{e['file']}  labels={e.get('labels')}" if e else "(none)"))
                if e:
                    p = prov.get(t, {})
                    phantoms = {True: "yes", False: "no", None: "unknown"}[p.get("trained_on_phantoms")]
                    print(f"           sha256={p.get('sha256')}  trained_on={p.get('trained_on')!r}  "
                          f"trained_on_phantoms={phantoms}  created={p.get('created') or 'unknown'}  "
                          f"imported={p.get('imported_at') or 'unknown'}")
            for name, e in store.encoders().items():
                print(f"  encoder {name}: {e['file']}  source={e.get('source')} revision={e.get('revision')} "
                      f"licence={e.get('licence')}")
        elif a.cmd == "verify":
            for t in store.entries():
                store.get(t)
                print(f"  {t}: ok")
            for name in store.encoders():
                store.get_encoder(name)
                print(f"  encoder {name}: ok")
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _download(a) -> int:
    """The ``models download`` subcommand: licence, download, check, import (see :mod:`.hub`)."""
    from . import hub  # deferred on purpose: hub loads torch to convert the weights; list/import/verify do without

    try:
        hub.download(a.name, a.revision, a.folder, a.accept_license,
                     progress=hub.progress_printer(f"downloading {hub.release(a.name)['filename']}"))
    except hub.LicenceNotAccepted as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
