"""Reading label maps (masks) and checking them against their frames."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from EchoFMEngine.cine import CineReadError
from EchoFMEngine.data.files import full_suffix


def read_label_image(path) -> np.ndarray:
    """A label map [H, W] or a stack [K, H, W] as int64 (npy/npz, PNG, or any SimpleITK format)."""
    path = Path(path)
    suf = full_suffix(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: mask file not found")
    try:
        if suf == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suf == ".npz":
            with np.load(path, allow_pickle=False) as z:
                key = "masks" if "masks" in z.files else z.files[0]
                arr = z[key]
        elif suf in (".png", ".bmp", ".tif", ".tiff"):
            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ValueError("OpenCV could not decode it")
            if arr.ndim == 3:  # labels saved as grey RGB: all channels must agree
                if not (arr[..., :1] == arr[..., :3]).all():
                    raise ValueError("colour image, expected one label per pixel")
                arr = arr[..., 0]
        else:
            import SimpleITK as sitk  # deferred: SimpleITK is slow to import; only NRRD/NIfTI/MHA masks need it

            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except (ValueError, OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CineReadError(path, f"cannot read mask ({reason})") from exc
    arr = np.asarray(arr)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path}: label image of shape {arr.shape} is not [H, W] or [K, H, W]")
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"{path}: mask holds non-integer values (dtype {arr.dtype})")
    return arr.astype(np.int64)


def check_mask(mask: np.ndarray, frame_shape: tuple[int, int], path) -> np.ndarray:
    """``mask`` [H, W] when it matches the frame size, else a ValueError naming the mask file."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or tuple(mask.shape) != tuple(frame_shape):
        raise ValueError(f"{path}: mask of size {tuple(mask.shape)} does not match its frames "
                         f"{tuple(frame_shape)}")
    if mask.min() < 0:
        raise ValueError(f"{path}: negative label {int(mask.min())} in mask")
    return mask
