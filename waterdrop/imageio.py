"""Image decoding and model-input preprocessing with OpenCV; no torch, so the runtime can use it.

``cv2.imread`` returns a half-grey image for a truncated JPEG and only prints a warning,
so every decode goes through ``cv2.imdecode`` on the file's bytes, which returns None then.
Images above ``MAX_PIXELS`` are refused before they can take gigabytes of memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAX_PIXELS = 100_000_000
# Read by OpenCV at its first decode; set before cv2 is imported anywhere in the process.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageDecodeError(ValueError):
    """A file that is not a decodable image; the message says why."""


def decode_image(data: bytes | np.ndarray, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array (H, W, 3).

    Grayscale becomes 3 channels, alpha is dropped, 16-bit is scaled to 8-bit and CMYK
    JPEGs are converted, all by OpenCV's colour decode.

    Raises:
        ImageDecodeError: empty, truncated, corrupt, unsupported or too large.
    """
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if buffer.size == 0:
        raise ImageDecodeError(f"{source}: empty file")
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise ImageDecodeError(f"{source}: OpenCV refused it ({str(err).strip().splitlines()[-1]})") from err
    if image is None:
        raise ImageDecodeError(f"{source}: not a decodable image (corrupt, truncated, or larger than "
                               f"{MAX_PIXELS} pixels)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """Read and decode one image file to RGB uint8 (H, W, 3); see ``decode_image``."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise ImageDecodeError(f"{path}: cannot read ({err.strerror or err})") from err
    return decode_image(data, str(path))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size; INTER_AREA when shrinking a lot (less aliasing), else linear."""
    height, width = image.shape[:2]
    shrink = max(height, width) > 2 * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_model_input(images: list[np.ndarray], size: int) -> np.ndarray:
    """RGB uint8 images of any size -> float32 NCHW batch in 0..255 (the exported model normalises)."""
    batch = np.stack([resize(image, size) for image in images])
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def list_images(path: str | Path) -> list[Path]:
    """A file as is, or the image files under a folder (recursive, sorted). Hidden files and
    folders (``.cache``, ``.ipynb_checkpoints``) are left out."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return [path]
