"""Built-in demo data: deterministic synthetic images, generated locally (no downloads).

Three tasks, learnable but not trivial:

* ``disgusting``: binary moderation with seven sub-classes. A positive is a textured patch
  (insects, scales, blotched skin, marbled meat, dense holes, dirt, slime) covering a part
  of the image; normal images carry look-alike patches of the same colours without the
  texture (hard negatives) plus background clutter. ``disgusting/unlabeled/`` holds
  unlabeled images of the same mix for mean-teacher training.
* ``thriller``: binary with five sub-classes (monster faces, blood splatter, sick tissue,
  dense creatures, shadow figures); its hard negatives are made-up faces (red lips, dark
  eye shadow), plain red shapes and plain tissue-coloured patches.
* ``scene_tags``: ten tags with a long tail of frequencies (sky on ~55 % of the images,
  glasses and forest on ~4 %). Some tags imply others (forest -> tree, boat -> water,
  cloud -> sky), grass and water exclude each other, and two are small objects (glasses,
  ball) whose boxes are written into the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

GENERATOR_VERSION = "4"
IMAGE_SIZE = 128

DISGUSTING_SUBCLASSES = ["insects", "reptiles", "skin_and_body", "organs_and_raw_meat", "dense_clusters",
                         "dirty_objects", "other"]
SMALL_OBJECTS = ["glasses", "ball"]

THRILLER_SUBCLASSES = ["horror_makeup_and_monsters", "gore_and_blood", "sick_tissue_and_organs",
                       "dense_insects_frogs_snakes", "other"]
# images, fraction of positives
# val picks the thresholds (and the checkpoint, with train.checkpoint: best); test, drawn the same way,
# is what the report is on.
SPLITS = {"train": (1400, 0.5), "val": (800, 0.25), "unlabeled": (600, 0.25), "test": (800, 0.25)}
THRILLER_SPLITS = {"train": (1000, 0.5), "val": (600, 0.25), "test": (600, 0.25)}
TAG_SPLITS = {"train": 1400, "val": 600, "test": 600}


def _color(rng, base, spread=25):
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in base)


def _background(rng) -> np.ndarray:
    """Smooth two-colour gradient, noise and a few random shapes (clutter)."""
    a, b = rng.integers(40, 230, 3), rng.integers(40, 230, 3)
    t = np.linspace(0, 1, IMAGE_SIZE)[:, None, None]
    image = (a * (1 - t) + b * t)[:, None, :, :].repeat(IMAGE_SIZE, 1).reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
    if rng.random() < 0.5:
        image = image.transpose(1, 0, 2)
    image = np.ascontiguousarray(image + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8)
    for _ in range(rng.integers(1, 4)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE, 2))
        if rng.random() < 0.5:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(8, 40)), y + int(rng.integers(8, 40))), color, -1)
        else:
            cv2.circle(image, (x, y), int(rng.integers(4, 20)), color, -1)
    return image


def _region(rng, low=0.28, high=0.5, hard=False):
    if hard:  # the offending part is a small corner of the image
        low, high = 0.2, 0.34
    side = int(IMAGE_SIZE * rng.uniform(low, high))
    x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - side, 2))
    return x, y, side


def _patch(image, rng, color, x, y, side):
    cv2.ellipse(image, (x + side // 2, y + side // 2), (side // 2, int(side * rng.uniform(0.35, 0.5))),
                float(rng.uniform(0, 180)), 0, 360, _color(rng, color), -1)


def _insects(image, rng, x, y, side):
    for _ in range(rng.integers(2, 5)):
        cx, cy = x + int(rng.integers(6, side - 6)), y + int(rng.integers(6, side - 6))
        body = _color(rng, (30, 25, 20), 15)
        for k in range(3):
            dy = (k - 1) * 3
            cv2.line(image, (cx - 8, cy + dy - 2), (cx + 8, cy + dy + 2), body, 1)
        cv2.ellipse(image, (cx, cy), (3, 6), float(rng.uniform(0, 180)), 0, 360, body, -1)


def _reptiles(image, rng, x, y, side):
    _patch(image, rng, (70, 110, 50), x, y, side)
    for i in range(0, side, 5):
        for j in range(0, side, 5):
            if (i - side / 2) ** 2 + (j - side / 2) ** 2 < (side / 2.3) ** 2:
                cv2.circle(image, (x + i + (j // 5) % 2 * 2, y + j), 2, _color(rng, (40, 70, 30), 10), 1)


def _skin(image, rng, x, y, side):
    _patch(image, rng, (215, 170, 140), x, y, side)
    for _ in range(rng.integers(5, 10)):
        cx, cy = x + int(rng.integers(4, side - 4)), y + int(rng.integers(4, side - 4))
        cv2.circle(image, (cx, cy), int(rng.integers(2, 5)), _color(rng, (150, 40, 70), 20), -1)


def _meat(image, rng, x, y, side):
    _patch(image, rng, (150, 20, 30), x, y, side)
    for _ in range(rng.integers(3, 6)):
        pts = np.stack([np.linspace(x + 4, x + side - 4, 6),
                        y + side / 2 + rng.normal(0, side / 5, 6)], 1).astype(np.int32)
        cv2.polylines(image, [pts], False, _color(rng, (240, 220, 210), 10), 1)


def _dense(image, rng, x, y, side):
    _patch(image, rng, (190, 160, 120), x, y, side)
    for i in range(3, side - 3, 6):
        for j in range(3, side - 3, 6):
            if (i - side / 2) ** 2 + (j - side / 2) ** 2 < (side / 2.4) ** 2:
                cv2.circle(image, (x + i + int(rng.integers(-1, 2)), y + j + int(rng.integers(-1, 2))), 2,
                           (40, 25, 20), -1)


def _dirty(image, rng, x, y, side):
    cv2.rectangle(image, (x, y), (x + side, y + side), _color(rng, (200, 200, 195), 15), -1)
    for _ in range(rng.integers(6, 12)):
        cx, cy = x + int(rng.integers(2, side - 2)), y + int(rng.integers(2, side - 2))
        cv2.ellipse(image, (cx, cy), (int(rng.integers(2, 6)), int(rng.integers(1, 4))), float(rng.uniform(0, 180)),
                    0, 360, _color(rng, (90, 70, 40), 20), -1)


def _slime(image, rng, x, y, side):
    for _ in range(rng.integers(3, 6)):
        x0 = x + int(rng.integers(0, side))
        ys = np.arange(y, y + side, 3)
        pts = np.stack([x0 + 3 * np.sin(ys / 4 + rng.uniform(0, 6)), ys], 1).astype(np.int32)
        cv2.polylines(image, [pts], False, _color(rng, (160, 200, 40), 15), 3)


PAINTERS = {"insects": _insects, "reptiles": _reptiles, "skin_and_body": _skin, "organs_and_raw_meat": _meat,
            "dense_clusters": _dense, "dirty_objects": _dirty, "other": _slime}
LOOKALIKE_COLORS = [(70, 110, 50), (215, 170, 140), (150, 20, 30), (190, 160, 120), (200, 200, 195)]


def disgusting_image(rng, label: str, hard: bool = False) -> np.ndarray:
    image = _background(rng)
    if label == "normal":
        for _ in range(2 if hard else 1):
            if rng.random() < (0.9 if hard else 0.6):  # hard negative: a positive's colour without its texture
                _patch(image, rng, LOOKALIKE_COLORS[rng.integers(len(LOOKALIKE_COLORS))], *_region(rng, hard=hard))
    else:
        PAINTERS[label](image, rng, *_region(rng, hard=hard))
    return image


def _face(image, rng, x, y, side, skin):
    cx, cy = x + side // 2, y + side // 2
    cv2.ellipse(image, (cx, cy), (int(side * 0.4), side // 2), 0, 0, 360, _color(rng, skin, 12), -1)
    return cx, cy


def _monster(image, rng, x, y, side):
    cx, cy = _face(image, rng, x, y, side, (225, 230, 220))
    eye = max(2, side // 8)
    for dx in (-side // 5, side // 5):
        cv2.circle(image, (cx + dx, cy - side // 8), eye, (10, 10, 10), -1)
        cv2.line(image, (cx + dx, cy - side // 8), (cx + dx, cy + side // 6), (110, 10, 10), 1)
    xs = np.linspace(cx - side // 4, cx + side // 4, 7)
    teeth = np.stack([xs, cy + side // 4 + np.tile([0, 4], 4)[:7]], 1).astype(np.int32)
    cv2.polylines(image, [teeth], False, (10, 10, 10), 2)


def _gore(image, rng, x, y, side):
    for _ in range(rng.integers(8, 16)):
        cx, cy = x + int(rng.integers(0, side)), y + int(rng.integers(0, side))
        red = _color(rng, (140, 10, 10), 25)
        cv2.circle(image, (cx, cy), int(rng.integers(1, max(2, side // 6))), red, -1)
        if rng.random() < 0.5:
            cv2.line(image, (cx, cy), (cx, cy + int(rng.integers(4, side // 2 + 5))), red, 1)


def _sick_tissue(image, rng, x, y, side):
    _patch(image, rng, (180, 110, 150), x, y, side)
    for _ in range(rng.integers(2, 5)):
        steps = rng.normal(0, 3, (8, 2)).cumsum(0) + (x + side / 2, y + side / 2)
        cv2.polylines(image, [steps.astype(np.int32)], False, (90, 30, 80), 1)
    for _ in range(rng.integers(4, 9)):
        cx, cy = x + int(rng.integers(4, side - 4)), y + int(rng.integers(4, side - 4))
        cv2.circle(image, (cx, cy), int(rng.integers(1, 4)), _color(rng, (220, 200, 80), 15), -1)


def _dense_creatures(image, rng, x, y, side):
    for _ in range(rng.integers(15, 30)):
        cx, cy = x + int(rng.integers(3, side - 3)), y + int(rng.integers(3, side - 3))
        cv2.ellipse(image, (cx, cy), (4, 3), float(rng.uniform(0, 180)), 0, 360, _color(rng, (80, 120, 40), 25), -1)
        cv2.circle(image, (cx + 1, cy - 1), 1, (10, 10, 10), -1)


def _shadow(image, rng, x, y, side):
    dark = _color(rng, (15, 15, 20), 8)
    cx = x + side // 2
    cv2.circle(image, (cx, y + side // 4), side // 5, dark, -1)
    cv2.rectangle(image, (cx - side // 4, y + side // 3), (cx + side // 4, y + side), dark, -1)
    for dx in (-side // 12 - 1, side // 12 + 1):
        cv2.circle(image, (cx + dx, y + side // 4), 1, (240, 30, 30), -1)


THRILLER_PAINTERS = {"horror_makeup_and_monsters": _monster, "gore_and_blood": _gore,
                     "sick_tissue_and_organs": _sick_tissue, "dense_insects_frogs_snakes": _dense_creatures,
                     "other": _shadow}


def _made_up_face(image, rng, x, y, side):
    cx, cy = _face(image, rng, x, y, side, (215, 170, 140))
    for dx in (-side // 5, side // 5):
        cv2.ellipse(image, (cx + dx, cy - side // 8), (max(2, side // 7), max(1, side // 12)), 0, 0, 360,
                    _color(rng, (60, 40, 70), 15), -1)
    cv2.ellipse(image, (cx, cy + side // 4), (side // 6, max(1, side // 14)), 0, 0, 360, _color(rng, (190, 20, 40)), -1)


def _thriller_lookalike(image, rng, x, y, side):
    kind = rng.integers(3)
    if kind == 0:
        _made_up_face(image, rng, x, y, side)
    else:
        _patch(image, rng, (140, 10, 10) if kind == 1 else (180, 110, 150), x, y, side)


def thriller_image(rng, label: str, hard: bool = False) -> np.ndarray:
    image = _background(rng)
    if label == "normal":
        if rng.random() < (0.9 if hard else 0.6):
            _thriller_lookalike(image, rng, *_region(rng, hard=hard))
    else:
        THRILLER_PAINTERS[label](image, rng, *_region(rng, hard=hard))
    return image


def _tree(image, rng, cx, base):
    h = int(rng.integers(22, 34))
    cv2.rectangle(image, (cx - 2, base - h // 3), (cx + 2, base), (90, 60, 30), -1)
    crown = np.array([[cx - h // 3, base - h // 3], [cx + h // 3, base - h // 3], [cx, base - h]], np.int32)
    cv2.fillPoly(image, [crown], _color(rng, (30, 120, 40), 15))


def scene_image(rng) -> tuple[np.ndarray, list[str], list[dict]]:
    """One scene, its tags (implied ones included) and boxes of its small objects."""
    tags: set[str] = set()
    horizon = int(rng.integers(50, 75))
    image = _background(rng)
    if rng.random() < 0.55:
        tags.add("sky")
        image[:horizon] = np.linspace((120, 170, 235), (190, 215, 245), horizon)[:, None, :].astype(np.uint8)
        if rng.random() < 0.4:
            tags.add("cloud")
            for _ in range(rng.integers(1, 3)):
                cx, cy = int(rng.integers(15, 113)), int(rng.integers(8, max(10, horizon - 15)))
                for dx in (-8, 0, 8):
                    cv2.circle(image, (cx + dx, cy + (4 if dx else 0)), 8, (250, 250, 250), -1)
    ground = rng.random()
    if ground < 0.4:
        tags.add("grass")
        image[horizon:] = _color(rng, (70, 150, 60), 15)
        for _ in range(60):
            gx, gy = int(rng.integers(0, 128)), int(rng.integers(horizon, 128))
            cv2.line(image, (gx, gy), (gx + 1, gy - 4), (40, 110, 40), 1)
    elif ground < 0.65:
        tags.add("water")
        image[horizon:] = _color(rng, (40, 90, 170), 10)
        for wy in range(horizon + 4, 128, 7):
            xs = np.arange(0, 128, 4)
            cv2.polylines(image, [np.stack([xs, wy + 2 * np.sin(xs / 5 + wy)], 1).astype(np.int32)], False,
                          (150, 190, 230), 1)
        if rng.random() < 0.25:
            tags.add("boat")
            bx, by = int(rng.integers(20, 100)), horizon + int(rng.integers(8, 20))
            cv2.fillPoly(image, [np.array([[bx - 14, by], [bx + 14, by], [bx + 9, by + 7], [bx - 9, by + 7]])],
                         (110, 60, 30))
            cv2.fillPoly(image, [np.array([[bx, by - 20], [bx, by - 1], [bx + 12, by - 1]])], (245, 245, 245))
    if "water" not in tags:
        if rng.random() < 0.06:
            tags.update({"forest", "tree"})
            for cx in sorted(rng.integers(8, 120, int(rng.integers(5, 8)))):
                _tree(image, rng, int(cx), horizon + int(rng.integers(4, 20)))
        elif rng.random() < 0.3:
            tags.add("tree")
            for cx in rng.integers(10, 118, int(rng.integers(1, 3))):
                _tree(image, rng, int(cx), horizon + int(rng.integers(4, 20)))
    if rng.random() < 0.25:
        tags.add("building")
        bx, bw, bh = int(rng.integers(0, 90)), int(rng.integers(25, 40)), int(rng.integers(30, 55))
        top = max(5, horizon + 10 - bh)
        cv2.rectangle(image, (bx, top), (bx + bw, horizon + 10), _color(rng, (140, 140, 145), 10), -1)
        for wx in range(bx + 4, bx + bw - 5, 8):
            for wy in range(top + 4, horizon + 4, 9):
                cv2.rectangle(image, (wx, wy), (wx + 4, wy + 5), (240, 230, 150), -1)
    boxes = []
    if rng.random() < 0.05:
        tags.add("glasses")
        r = int(rng.integers(3, 6))
        gx, gy = int(rng.integers(r + 2, 126 - 4 * r)), int(rng.integers(r + 2, 126 - r))
        for cx in (gx, gx + 2 * r + 3):
            cv2.circle(image, (cx, gy), r, (15, 15, 15), 1)
        cv2.line(image, (gx + r, gy), (gx + r + 3, gy), (15, 15, 15), 1)
        boxes.append({"label": "glasses", "box": [gx - r - 1, gy - r - 1, gx + 3 * r + 4, gy + r + 1]})
    if rng.random() < 0.1:
        tags.add("ball")
        r = int(rng.integers(4, 7))
        cx, cy = int(rng.integers(r, 128 - r)), int(rng.integers(r, 128 - r))
        cv2.circle(image, (cx, cy), r, (230, 60, 20), -1)
        cv2.line(image, (cx - r, cy), (cx + r, cy), (250, 250, 250), 1)
        boxes.append({"label": "ball", "box": [cx - r, cy - r, cx + r, cy + r]})
    return image, sorted(tags), boxes


def _write(path: Path, image_rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


def _binary_task(root: Path, name: str, splits: dict, subclasses: list[str], paint, seed: int, task_id: int,
                 scale: float, hard: bool) -> None:
    for split_index, (split, (count, positive_fraction)) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, task_id, split_index])
        folder = root / name / split
        folder.mkdir(parents=True, exist_ok=True)
        count = max(16, int(count * scale))
        positives = int(count * positive_fraction)
        labels = ["normal"] * (count - positives) + [subclasses[i % len(subclasses)] for i in range(positives)]
        lines = []
        for i, label in enumerate(rng.permutation(labels)):
            _write(folder / f"{i:05d}.jpg", paint(rng, str(label), hard))
            lines.append(json.dumps({"image": f"{split}/{i:05d}.jpg", "labels": [str(label)]}))
        (root / name / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def generate(root: str | Path, seed: int = 0, scale: float = 1.0, hard: bool = False) -> Path:
    """Write the demo tasks under ``root`` (JSONL manifests + JPEGs). ``scale`` shrinks the
    image counts (tests use small sets). ``hard`` makes the moderation positives small
    (20-34 % of the image side) and nearly every normal image carry look-alikes, so that
    recipes can be told apart (``benchmarks/moderation_ablation.py``)."""
    root = Path(root)
    _binary_task(root, "disgusting", SPLITS, DISGUSTING_SUBCLASSES, disgusting_image, seed, 1, scale, hard)
    _binary_task(root, "thriller", THRILLER_SPLITS, THRILLER_SUBCLASSES, thriller_image, seed, 3, scale, hard)
    for split_index, (split, count) in enumerate(TAG_SPLITS.items()):
        rng = np.random.default_rng([seed, 2, split_index])
        folder = root / "scene_tags" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(max(16, int(count * scale))):
            image, tags, boxes = scene_image(rng)
            _write(folder / f"{i:05d}.jpg", image)
            lines.append(json.dumps({"image": f"{split}/{i:05d}.jpg", "labels": tags, "boxes": boxes}))
        (root / "scene_tags" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "COMPLETE").write_text(f"{GENERATOR_VERSION} {seed} {scale} {hard}\n")
    return root


def ensure_demo_data(root: str | Path, seed: int = 0) -> bool:
    """Generate the demo data unless a complete copy of this generator version is there.
    Returns True when it generated."""
    marker = Path(root) / "COMPLETE"
    if marker.is_file() and marker.read_text().split() == [GENERATOR_VERSION, str(seed), "1.0", "False"]:
        return False
    generate(root, seed)
    return True
