"""A grid of thumbnails with a caption under each, for a person to check flagged images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from waterdrop.imageio import ImageDecodeError, read_image, resize

_CAPTION_HEIGHT = 34


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """Letterbox into a side x side tile, keeping the aspect ratio."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA)
    tile = np.full((side, side, 3), 40, np.uint8)
    top, left = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    tile[top:top + small.shape[0], left:left + small.shape[1]] = small
    return tile


def contact_sheet(paths: list[str | Path], captions: list[str], out: str | Path, tile: int = 160,
                  columns: int = 8) -> Path:
    """Write a PNG grid of ``paths`` with one caption each (two lines at most, split at
    "\\n"). An unreadable image gets a grey tile that says so. Returns ``out``."""
    if len(paths) != len(captions):
        raise ValueError(f"{len(paths)} paths but {len(captions)} captions")
    columns = max(1, min(columns, len(paths)))
    rows = max(1, -(-len(paths) // columns))
    cell_height = tile + _CAPTION_HEIGHT
    sheet = np.full((rows * cell_height, columns * tile, 3), 255, np.uint8)
    for i, (path, caption) in enumerate(zip(paths, captions)):
        try:
            thumb = _fit(read_image(path), tile)
        except ImageDecodeError:
            thumb = resize(np.full((8, 8, 3), 128, np.uint8), tile)
            caption = f"unreadable\n{caption}"
        top, left = (i // columns) * cell_height, (i % columns) * tile
        sheet[top:top + tile, left:left + tile] = thumb
        for line_no, line in enumerate(caption.split("\n")[:2]):
            cv2.putText(sheet, line[:28], (left + 3, top + tile + 13 + 15 * line_no), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, (0, 0, 0), 1, cv2.LINE_AA)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return out
