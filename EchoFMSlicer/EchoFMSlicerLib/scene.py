"""The MRML scene and the module logics the library needs, in Slicer or headless (slicer-core).

Node classes of Slicer's loadable modules (sequences, segmentations, ...) exist in a scene only
after the module's logic was given the scene, and segmentations convert between
representations only with an application logic. Inside Slicer the application already holds
these logics; headless (tests, scripts with PyPI ``slicer-core``) :func:`new_scene` makes them.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import slicer

# Slicer's module names under which vtkSlicerApplicationLogic.GetModuleLogic() finds each logic.
_MODULES = {
    "sequences": ("Sequences", "vtkSlicerSequencesLogic"),
    "segmentations": ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    "volumes": ("Volumes", "vtkSlicerVolumesLogic"),
    "tables": ("Tables", "vtkSlicerTablesLogic"),
    "plots": ("Plots", "vtkSlicerPlotsLogic"),
}

_REGISTERED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class Logics:
    """The logics bound to one scene (``app`` is the application logic)."""

    app: object
    sequences: object
    segmentations: object
    volumes: object
    tables: object
    plots: object

    def update_proxies(self, browser) -> None:
        """Copy the browser's current items into its proxy nodes (Slicer does this on its own timer)."""
        self.sequences.UpdateProxyNodesFromSequences(browser)


def register_modules(scene, app_logic=None) -> Logics:
    """Logics for ``scene``: reuse Slicer's (pass ``slicer.app.applicationLogic()``) or create them.

    Idempotent: a second call for the same scene returns the same logics."""
    if scene is None:
        raise ValueError("register_modules: scene is None")
    known = _REGISTERED.get(scene)
    if known is not None:
        return known
    created_app = app_logic is None
    if created_app:
        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetMRMLScene(scene)
        colors = app_logic.GetColorLogic()
        if colors is not None:
            colors.SetMRMLScene(scene)
            colors.AddDefaultColorNodes()
    found = {}
    for key, (module, cls) in _MODULES.items():
        logic = None if created_app else app_logic.GetModuleLogic(module)
        if logic is None:
            logic = getattr(slicer, cls)()
            logic.SetMRMLApplicationLogic(app_logic)
            logic.SetMRMLScene(scene)
            app_logic.SetModuleLogic(module, logic)
        found[key] = logic
    logics = Logics(app=app_logic, **found)
    _REGISTERED[scene] = logics
    return logics


def new_scene() -> tuple:
    """A fresh headless scene with every node class the library uses: ``(scene, logics)``."""
    scene = slicer.vtkMRMLScene()
    return scene, register_modules(scene)


def node_ids(scene) -> set:
    """IDs of all nodes now in the scene."""
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@contextlib.contextmanager
def all_or_nothing(scene):
    """Undo every node added inside the block when it raises: the scene is left as it was."""
    before = node_ids(scene)
    try:
        yield
    except BaseException:
        # Browsers go first (a browser that outlives its proxy makes a new one), then the rest
        # newest first; repeat in case a removal made a node.
        for _ in range(3):
            order = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
            added = [n for n in reversed(order) if n.GetID() not in before]
            if not added:
                break
            added.sort(key=lambda n: not n.IsA("vtkMRMLSequenceBrowserNode"))
            for node in added:
                if scene.GetNodeByID(node.GetID()) is node:
                    scene.RemoveNode(node)
        raise


def add_node(scene, class_name: str, name: str, unique: bool = True):
    """Add a new node of ``class_name`` named ``name`` (made unique in the scene unless told not to)."""
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name) if unique else name)
    if node is None:
        raise RuntimeError(f"cannot create a {class_name} node: its module is not registered "
                           "(call register_modules(scene) first)")
    return node


def write_node(node, path, suffix: str, storage_class: str, what: str) -> Path:
    """Write ``node`` to ``path`` (which must end in ``suffix``) through a ``storage_class`` storage node."""
    path = Path(path)
    if not path.name.lower().endswith(suffix):
        raise ValueError(f"{path}: a {what} is saved as {suffix}")
    storage = node.GetStorageNode()
    if storage is None or not storage.IsA(storage_class):
        storage = add_node(node.GetScene(), storage_class, f"{node.GetName()} storage")
        node.SetAndObserveStorageNodeID(storage.GetID())
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise OSError(f"{path}: Slicer could not write the {what}")
    return path


def logics_for(scene, logics: Optional[Logics] = None) -> Logics:
    """``logics`` when given, else the ones registered for the scene (registering them if needed)."""
    return logics if logics is not None else register_modules(scene)
