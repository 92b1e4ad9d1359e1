"""Image decoding and model-input preprocessing with OpenCV; no torch, so the runtime can use it.

``cv2.imread`` returns a half-grey image for a truncated JPEG and only prints a warning,
so every decode goes through ``cv2.imdecode`` on the file's bytes, which returns None then.
Images above ``MAX_PIXELS`` are refused from their header, before they are decoded and
can take gigabytes of memory; a file whose size cannot be read from its header (an
unknown format, a damaged header) is refused too. OpenCV's own limit
(``OPENCV_IO_MAX_IMAGE_PIXELS``) is set as well, but OpenCV reads it when it is imported,
so it does not hold where cv2 was imported first (mmengine does); the header check does
not depend on import order.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

MAX_PIXELS = 100_000_000
# Read by OpenCV when it is imported; only a second line of defence (see above).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageDecodeError(ValueError):
    """A file that is not a decodable image; the message says why."""


_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: memoryview) -> tuple[int, int] | None:
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xDA)):  # markers without a length
            position += 2
            continue
        if marker in _JPEG_FRAME_MARKERS:
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        position += 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
    return None


def _tiff_size(data: memoryview) -> tuple[int, int] | None:
    # The directory may be anywhere, often at the end of the file.
    order = "<" if bytes(data[:2]) == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    size = {}
    for entry in range(count):
        tag, kind, _, value = struct.unpack(order + "HHI4s", data[ifd + 2 + 12 * entry:ifd + 14 + 12 * entry])
        if tag in (256, 257):
            size[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value[:2 if kind == 3 else 4])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def _pnm_size(data: memoryview) -> tuple[int, int] | None:
    head = bytes(data[2:512]).split(b"\n")
    numbers = [int(token) for line in head for token in line.split(b"#")[0].split() if token.isdigit()]
    return (numbers[0], numbers[1]) if len(numbers) >= 2 else None


def header_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) read from the header of a JPEG, PNG, GIF, BMP, WebP, TIFF or PNM file
    (the whole file is given: a TIFF's directory can be at its end); None when the format
    is not one of these or the header is damaged."""
    data = memoryview(data).cast("B")
    start = bytes(data[:12])
    try:
        if start[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", data[16:24])
        if start[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if start[:4] == b"GIF8":
            return struct.unpack("<HH", data[6:10])
        if start[:2] == b"BM":
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 bitmap: 16-bit sizes
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if start[:4] == b"RIFF" and start[8:12] == b"WEBP":
            chunk = bytes(data[12:16])
            if chunk == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", data[26:30])
                return width & 0x3FFF, height & 0x3FFF
        if start[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
        if start[:1] == b"P" and start[1:2] in b"1234567" and start[2:3].isspace():
            return _pnm_size(data)
    except (struct.error, ValueError, IndexError):
        return None
    return None


#: libjpeg's DCT-domain scales OpenCV exposes (IMREAD_REDUCED_COLOR_2/4/8), largest first.
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def reduction(size: tuple[int, int], min_side: int | None) -> tuple[int, int]:
    """(factor, OpenCV flag) of the smallest JPEG decode whose shorter side stays at or above
    ``min_side``: libjpeg scales in the DCT domain, several times faster than decoding every
    pixel and resizing. (1, IMREAD_COLOR) where no reduction keeps that side."""
    if min_side:
        for factor, flag in _REDUCED:
            if min(size) // factor >= min_side:
                return factor, flag
    return 1, cv2.IMREAD_COLOR


def decode_image(data: bytes | np.ndarray, source: str = "<bytes>", min_side: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array (H, W, 3).

    Grayscale becomes 3 channels, alpha is dropped, 16-bit is scaled to 8-bit and CMYK
    JPEGs are converted, all by OpenCV's colour decode. With ``min_side`` a JPEG is decoded at
    the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side stays at or above it (what the
    next step needs: the model's input size, or the smallest training crop); other formats
    decode whole.

    Raises:
        ImageDecodeError: empty, truncated, corrupt, unsupported or too large.
    """
    return _decode(data, source, min_side)[0]


def _decode(data: bytes | np.ndarray, source: str, min_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """``decode_image``, and the image's own (width, height) as a whole decode shows it, which a
    reduced decode does not: the header's, turned where OpenCV applied an EXIF rotation."""
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if buffer.size == 0:
        raise ImageDecodeError(f"{source}: empty file")
    size = header_size(buffer)
    if size is None:
        raise ImageDecodeError(f"{source}: not an image waterdrop reads (JPEG, PNG, BMP, GIF, WebP, TIFF, PNM), or "
                               "its header is damaged")
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageDecodeError(f"{source}: {size[0]} x {size[1]} pixels is over the limit of {MAX_PIXELS:,} "
                               "(refused before decoding)")
    factor, flag = reduction(size, min_side) if bytes(buffer[:2]) == b"\xff\xd8" else (1, cv2.IMREAD_COLOR)
    try:
        image = cv2.imdecode(buffer, flag)
    except cv2.error as err:
        raise ImageDecodeError(f"{source}: OpenCV refused it ({str(err).strip().splitlines()[-1]})") from err
    if image is None:
        raise ImageDecodeError(f"{source}: not a decodable image (corrupt or truncated)")
    width, height = size
    # libjpeg rounds a scaled side up; OpenCV turns the image by its EXIF orientation after decoding.
    turned = (image.shape[1], image.shape[0]) == (-(-height // factor), -(-width // factor)) and width != height
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (height, width) if turned else (width, height)


def read_image(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Read and decode one image file to RGB uint8 (H, W, 3); see ``decode_image``."""
    return read_with_size(path, min_side)[0]


def read_with_size(path: str | Path, min_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """``read_image``, and the image's own (width, height) as a whole decode shows it (which a
    reduced decode does not): for sizes and boxes in the file's pixels."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise ImageDecodeError(f"{path}: cannot read ({err.strerror or err})") from err
    return _decode(data, str(path), min_side)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Stretch to size x size: each side that shrinks by area averaging, each that grows linearly.

    Linear interpolation weighs 2x2 source pixels per output pixel unevenly and, shrinking near 2x, all
    but skips every other row and column: fine marks (a faint watermark, small text) alias. Area
    averaging weighs every source pixel alike, but OpenCV's INTER_AREA repeats pixels on a side that
    grows, so a wide image that is also short is shrunk across first, then grown down.
    """
    height, width = image.shape[:2]
    if height >= size and width >= size:
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    if height <= size and width <= size:
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    across = (size, height) if width > size else (width, size)
    return cv2.resize(cv2.resize(image, across, interpolation=cv2.INTER_AREA), (size, size),
                      interpolation=cv2.INTER_LINEAR)


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


def decoded_images(given: Iterable[str | Path],
                   min_side: int | None = None) -> Iterator[tuple[Path, np.ndarray | ImageDecodeError]]:
    """Every image of the given files and folders (searched recursively), in order: decoded
    (RGB uint8; ``min_side``: see ``decode_image``), or the error that says why not. A folder
    without images stands for itself, with its error, so that it is reported too."""
    for path, got in decoded_with_sizes(given, min_side):
        yield path, got if isinstance(got, ImageDecodeError) else got[0]


def decoded_with_sizes(given: Iterable[str | Path], min_side: int | None = None
                       ) -> Iterator[tuple[Path, tuple[np.ndarray, tuple[int, int]] | ImageDecodeError]]:
    """``decoded_images`` with each image's own (width, height) (``read_with_size``)."""
    for path in (p for name in given for p in list_images(name) or [Path(name)]):
        try:
            if path.is_dir():
                raise ImageDecodeError(f"{path}: a folder without images")
            yield path, read_with_size(path, min_side)
        except ImageDecodeError as err:
            yield path, err
