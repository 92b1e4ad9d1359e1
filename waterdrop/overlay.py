"""Heat-map overlays of activation maps on the images they explain; numpy and OpenCV only, so
that the torch-free runtime (``tools/predict.py --cam``) and ``tools/explain.py`` share them.

A map (Grad-CAM's, or a class activation map from the ONNX file) is normalised to [0, 1]
(ReLU, then divided by its maximum), resized bilinearly to the image, coloured with
OpenCV's JET colour map (blue = nothing, red = the strongest evidence) and blended in.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# OpenCV by way of imageio, which sets OpenCV's pixel limit before it is first imported.
from waterdrop.imageio import cv2

# Dots too: they separate the parts of an overlay's name.
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def normalize_map(cam: np.ndarray) -> np.ndarray:
    """ReLU then divide by the maximum: float32 in [0, 1]. A map without positive values
    (no evidence anywhere) stays all zero."""
    positive = np.maximum(np.asarray(cam, dtype=np.float32), 0)
    peak = float(positive.max()) if positive.size else 0.0
    return positive / peak if peak > 0 else positive


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured map into the image.

    Args:
        image: RGB uint8 (H, W, 3), the original image.
        cam: (h, w) map of any resolution covering the whole image (the model's input is the
            image stretched to a square, so the map is stretched back the same way).
        alpha: weight of the heat map in the blend.

    Returns:
        RGB uint8 (H, W, 3).
    """
    height, width = image.shape[:2]
    heat = cv2.resize(normalize_map(cam), (width, height), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap(np.round(255 * np.clip(heat, 0, 1)).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    return np.round((1 - alpha) * image.astype(np.float32) + alpha * coloured).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG; raises OSError when it cannot be written."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the overlay")
    Path(path).write_bytes(encoded.tobytes())


def overlay_name(stem: str, task: str, label: str | None = None, stage2: bool = False) -> str:
    """``<image stem>.<task>[.<label>][.stage2].png``; characters other than letters, digits,
    ``_`` and ``-`` in a label become ``_``."""
    parts = [stem, task, *([_UNSAFE.sub("_", label)] if label else []), *(["stage2"] if stage2 else [])]
    return ".".join(parts) + ".png"


class UniqueStems:
    """File stems for the images of one run, unique among themselves: the image's own stem,
    or ``<stem>-2``, ``<stem>-3`` ... when an image of the same stem (another folder, another
    suffix) came first. Works on a stream of images, in the order given."""

    def __init__(self):
        self._used: set[str] = set()

    def __call__(self, path: str | Path) -> str:
        stem = _UNSAFE.sub("_", Path(path).stem) or "image"
        candidate, count = stem, 1
        while candidate in self._used:
            count += 1
            candidate = f"{stem}-{count}"
        self._used.add(candidate)
        return candidate
