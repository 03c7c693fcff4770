"""Which of the engine's Python packages the running Python lacks, and how to install them.

Slicer's Python ships numpy, vtk and SimpleITK (built with Slicer): those are never listed for
installation when they can be imported, whatever version pip metadata says. torch and
torchvision go through the PyTorch extension's ``PyTorchUtils`` when it is present (it picks
the right CUDA/CPU build). Nothing here installs anything: the widget asks the user first and
then runs the plan (:func:`run_pip`: Slicer's ``pip_ensure`` where this Slicer has one, else
``slicer.util.pip_install``).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

PROJECT_NAME = "echofm-slicer"
PROTECTED = ("numpy", "vtk", "simpleitk")         # shipped with Slicer: never replaced
TORCH_PACKAGES = ("torch", "torchvision")          # installed through PyTorchUtils when available
IMPORT_NAMES = {                                   # pip name (normalised) -> module to import
    "pyyaml": "yaml", "scikit-image": "skimage", "scikit-learn": "sklearn",
    "opencv-python-headless": "cv2", "opencv-python": "cv2", "pylibjpeg-libjpeg": "libjpeg",
    "pylibjpeg-openjpeg": "openjpeg", "pylibjpeg-rle": "rle", "simpleitk": "SimpleITK",
}
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Requirement:
    """One requirement string split into the package name and its version specifier."""

    text: str
    name: str
    specifier: str = ""

    @classmethod
    def parse(cls, text: str) -> "Requirement":
        body = text.split(";", 1)[0]                       # environment markers are not evaluated here
        m = _REQ.match(body)
        if not m:
            raise ValueError(f"not a requirement string: {text!r}")
        return cls(text=body.strip(), name=normalise(m.group(1)), specifier=m.group(3).replace(" ", ""))

    @property
    def import_name(self) -> str:
        return IMPORT_NAMES.get(self.name, self.name.replace("-", "_"))


def find_pyproject(start: Optional[Path] = None) -> Optional[Path]:
    """The project's ``pyproject.toml``: in a source checkout two folders above this package,
    in an installed extension beside it (the CMake install copies it there)."""
    here = Path(start or __file__).resolve()
    for folder in here.parents:
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and f'name = "{PROJECT_NAME}"' in candidate.read_text(encoding="utf-8"):
            return candidate
    return None


def engine_requirements(pyproject: Optional[Path] = None) -> list[str]:
    """The engine's runtime requirements (``[project.dependencies]``), as pip requirement strings."""
    path = Path(pyproject) if pyproject is not None else find_pyproject()
    if path is not None:
        try:
            import tomllib  # deferred: optional, Python < 3.11 has no tomllib
        except ModuleNotFoundError:        # Python < 3.11
            tomllib = None
        text = path.read_text(encoding="utf-8")
        if tomllib is not None:
            try:
                deps = tomllib.loads(text).get("project", {}).get("dependencies")
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from None
        else:
            m = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
            deps = re.findall(r'"([^"]+)"', m.group(1)) if m else None
        if not deps:
            raise ValueError(f"{path}: has no [project] dependencies list")
        return [str(d) for d in deps]
    try:
        reqs = importlib.metadata.requires(PROJECT_NAME) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"cannot find the engine's requirements: no pyproject.toml of {PROJECT_NAME} "
                                f"above {Path(__file__).parent} and the package is not installed") from None
    return [r for r in reqs if "extra ==" not in r]


def installed_version(req: Requirement) -> Optional[str]:
    """Version from pip metadata, or None when no distribution of that name is installed."""
    try:
        return importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(req: Requirement) -> bool:
    """Installed and, when pip metadata exists, within the specifier. A module that imports but
    has no metadata (built into Slicer, or a sibling distribution such as opencv-python for
    opencv-python-headless) counts as satisfied: replacing it could break the application."""
    version = installed_version(req)
    if version is None:
        return importlib.util.find_spec(req.import_name) is not None
    if not req.specifier:
        return True
    try:
        # deferred: packaging may be absent from a bare Slicer Python
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion  # deferred: as above
    except ModuleNotFoundError:
        return True                        # cannot compare versions here: presence is enough
    try:
        return SpecifierSet(req.specifier).contains(version, prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return True


def missing_requirements(requirements: Optional[Sequence[str]] = None) -> list[str]:
    """Requirement strings of ``requirements`` (default: the engine's) that this Python lacks.

    Packages that Slicer ships (numpy, vtk, SimpleITK) are left out whenever they import."""
    missing = []
    for text in (engine_requirements() if requirements is None else requirements):
        req = Requirement.parse(text)
        if req.name in PROTECTED and importlib.util.find_spec(req.import_name) is not None:
            continue
        if not is_satisfied(req):
            missing.append(req.text)
    return missing


def pytorch_utils_available() -> bool:
    """True when the PyTorch extension's ``PyTorchUtils`` module can be imported (inside Slicer)."""
    return importlib.util.find_spec("PyTorchUtils") is not None


@dataclass
class InstallPlan:
    """What to install: ``torch`` requirements (through PyTorchUtils when ``use_pytorch_utils``,
    else with pip) and the other ``pip`` requirements."""

    torch: list = field(default_factory=list)
    pip: list = field(default_factory=list)
    use_pytorch_utils: bool = False

    @property
    def empty(self) -> bool:
        return not self.torch and not self.pip

    @property
    def torch_version_requirement(self) -> str:
        """The specifier PyTorchUtils' ``installTorch(torchVersionRequirement=...)`` takes."""
        for text in self.torch:
            req = Requirement.parse(text)
            if req.name == "torch":
                return req.specifier
        return ""

    def describe(self) -> str:
        """One paragraph for the confirmation dialog."""
        if self.empty:
            return "All Python packages EchoFM needs are installed."
        parts = []
        if self.torch:
            how = "the PyTorch extension (PyTorchUtils)" if self.use_pytorch_utils else "pip"
            parts.append(f"PyTorch ({', '.join(self.torch)}) through {how}")
        if self.pip:
            parts.append("with pip: " + ", ".join(self.pip))
        return ("EchoFM needs Python packages this Slicer does not have yet. Install " + "; ".join(parts) +
                "? This downloads several hundred MB and may take minutes; numpy, vtk and SimpleITK of "
                "Slicer are not touched.")


def install_plan(missing: Sequence[str], use_pytorch_utils: Optional[bool] = None) -> InstallPlan:
    """Split missing requirements into torch (PyTorchUtils) and plain pip installs."""
    use = pytorch_utils_available() if use_pytorch_utils is None else use_pytorch_utils
    plan = InstallPlan(use_pytorch_utils=use)
    for text in missing:
        req = Requirement.parse(text)
        if req.name in PROTECTED:
            raise ValueError(f"refusing to install {req.text!r}: {req.name} ships with Slicer and must not "
                             f"be replaced")
        (plan.torch if req.name in TORCH_PACKAGES else plan.pip).append(req.text)
    return plan


def pip_command(plan: InstallPlan, python: Optional[Sequence[str]] = None) -> list[str]:
    """``python -m pip install ...`` for a plan's pip part (and its torch part when PyTorchUtils is
    not used): what to run by hand outside Slicer, or what the docs show."""
    reqs = list(plan.pip) + ([] if plan.use_pytorch_utils else list(plan.torch))
    return [*(python or [sys.executable]), "-m", "pip", "install", *reqs]


# Where Slicer keeps pip_ensure: ``slicer.pydeps`` (5.11) and ``slicer.packaging`` (5.12). Neither is an
# attribute of ``slicer`` until something imports it, so it is imported here, explicitly.
PIP_ENSURE_MODULES = ("slicer.packaging", "slicer.pydeps")


def slicer_pip_ensure():
    """Slicer's ``pip_ensure`` function, or None on a Slicer (or slicer-core) without one."""
    for name in PIP_ENSURE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(module, "pip_ensure", None)
        if callable(fn):
            return fn
    return None


def run_pip(requirements: Sequence[str], pip_install=None, pip_ensure=None, requester: str = "EchoFM") -> str:
    """Install ``requirements`` the user has already agreed to; returns which way ("pip_ensure" or
    "pip_install").

    ``pip_ensure`` (default: :func:`slicer_pip_ensure`) takes ``packaging`` Requirement objects; it is
    called without its own prompt (the widget asked already, so declining never surfaces as an
    error) and, where it supports ``skip_packages``, told to leave Slicer's numpy, vtk and SimpleITK
    and the PyTorch extension's torch alone, as SlicerNNUNet does. Without it,
    ``pip_install(list)`` (``slicer.util.pip_install``)."""
    reqs = [str(r) for r in requirements]
    if not reqs:
        return "nothing"
    ensure = slicer_pip_ensure() if pip_ensure is None else pip_ensure
    if ensure is not None:
        try:
            # deferred: packaging may be absent, as above
            from packaging.requirements import Requirement as PackagingRequirement
        except ModuleNotFoundError:
            ensure = None
    if ensure is not None:
        try:
            params = set(inspect.signature(ensure).parameters)
        except (TypeError, ValueError):
            params = set()
        kwargs = {"requester": requester} if "requester" in params else {}
        if "prompt_install" in params:
            kwargs["prompt_install"] = False
        if "skip_packages" in params:
            wanted = {Requirement.parse(r).name for r in reqs}
            kwargs["skip_packages"] = [p for p in ("numpy", "vtk", "SimpleITK", *TORCH_PACKAGES)
                                       if normalise(p) not in wanted]
        ensure([PackagingRequirement(r) for r in reqs], **kwargs)
        return "pip_ensure"
    if pip_install is None:
        raise RuntimeError("no way to install Python packages here: neither Slicer's pip_ensure nor "
                           "slicer.util.pip_install is available")
    pip_install(reqs)
    return "pip_install"
