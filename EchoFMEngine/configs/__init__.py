"""The training configs shipped with the engine (package data), and how a ``--config`` value finds one.

The YAML files sit beside this module, so an installed wheel, the Slicer extension's module path and a
source checkout all find them the same way. A ``--config`` value is a file path, or the name of a shipped
config (``finetune_ef`` or ``finetune_ef.yaml``); ``Resources/configs/NAME.yaml``, the path the docs use in
a checkout, also resolves to the shipped file where that folder is absent (an installed wheel, any cwd).
Standard library only: the Slicer library and ``--help`` read it without torch."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path, PurePath
from typing import Union

# pip installs packages unzipped, so the package's resources are plain files on disk.
CONFIG_DIR = Path(str(files(__name__)))
LEGACY_DIR = PurePath("Resources", "configs")   # where the configs lived before 0.2; docs still name it


def names() -> list[str]:
    """Names of the shipped configs (``demo``, ``finetune_view``, ...), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def shipped(name: str) -> Path:
    """The shipped config called ``name`` (with or without ``.yaml``); FileNotFoundError listing the others."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = CONFIG_DIR / f"{stem}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {name} (shipped configs: {', '.join(names())})")
    return path


def find_config(value: Union[str, Path]) -> Path:
    """The file a ``--config`` value means: an existing file as given; else a shipped config's name, or
    ``Resources/configs/NAME.yaml`` where that folder is absent. FileNotFoundError naming the value."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    bare = len(path.parts) == 1 and path.suffix in ("", ".yaml")
    legacy = path.suffix == ".yaml" and tuple(path.parent.parts[-2:]) == LEGACY_DIR.parts
    if (bare or legacy) and (CONFIG_DIR / f"{path.stem}.yaml").is_file():
        return CONFIG_DIR / f"{path.stem}.yaml"
    if bare:
        raise FileNotFoundError(f"config file not found: {value} (shipped configs: {', '.join(names())})")
    raise FileNotFoundError(f"config file not found: {value}")


__all__ = ["CONFIG_DIR", "names", "shipped", "find_config"]
