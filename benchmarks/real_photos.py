"""Build three real-photograph binary quality tasks from photographs shipped in Debian packages.

Each task is a folder of ``positive/`` vs ``normal/`` JPEGs (quality 95, 224-320 px on the short side):

* ``collage``: positive = 2-4 photo crops tiled in one image (side by side, stacked, 2x2, one big + two
  small, three in a row), with a thin gap of random colour or none; normal = one crop of one photo.
* ``jpeg_artifacts``: positive = a crop compressed at JPEG quality 5-20; normal = the same pipeline at
  quality 90-98. Both get the same random rescale and are re-saved at quality 95, so only the artefacts
  differ, not the file format.
* ``plain_background``: positive = a photo crop (the "product") on a plain white, near-white or light
  pastel background, sometimes with a soft shadow; normal = a plain crop, a third of them picked from the
  smoothest area of the photo (sky, walls) so that flatness alone does not give the answer.

The split is by SOURCE PHOTOGRAPH: every photo belongs to exactly one of train / val / test (60/20/20,
seeded, interleaved per package), and a split's images are made only from its own photos. The test set
thus measures generalisation to photographs the model never saw, not recognition of their pixels.

Photos come from pinned Debian (bookworm) packages, fetched with ``apt-get download`` (no install; run
``apt-get update`` once first). Only the allow-list ``PHOTOS`` is used: every file in it was looked at by
hand and is a real photograph, not an illustration, render, painting, gradient or logo. Pinned packages
(licence as read from the package's ``copyright`` file):

    lomiri-wallpapers-16.04      20.04.0-2         CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0 (per file)
    lomiri-wallpapers-20.04      20.04.0-2         CC-BY-SA-3.0 (the one photo used)
    mate-backgrounds             1.26.0-1          GPL-2+
    palapeli-data                4:22.12.3-1       GPL-2+
    plasma-workspace-wallpapers  4:5.27.5-2        GPL-2+
    opencv-doc                   4.6.0+dfsg-12     Apache-2.0 AND BSD-3-Clause
    python3-skimage              0.19.3-8          BSD-3-Clause (photos: public domain / CC0 / Middlebury)
    python3-sklearn              1.2.1+dfsg-1      BSD-3-Clause (china.jpg, flower.jpg: CC-BY-2.0)

Usage::

    .venv/bin/python benchmarks/real_photos.py [--out work_dirs/real_photos] [--cache work_dirs/real_photos_cache]
                                               [--seed 0]

Idempotent: packages, decoded photos and images already on disk are kept. Each image is drawn from its own
generator seeded by (seed, task, split, class, index), so a rerun only fills in what is missing and gives
the same files as a clean run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import subprocess
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np

# package -> (version, licence); see the module docstring.
PACKAGES: dict[str, tuple[str, str]] = {
    "lomiri-wallpapers-16.04": ("20.04.0-2", "CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0 (per file)"),
    "lomiri-wallpapers-20.04": ("20.04.0-2", "CC-BY-SA-3.0"),
    "mate-backgrounds": ("1.26.0-1", "GPL-2+"),
    "palapeli-data": ("4:22.12.3-1", "GPL-2+"),
    "plasma-workspace-wallpapers": ("4:5.27.5-2", "GPL-2+"),
    "opencv-doc": ("4.6.0+dfsg-12", "Apache-2.0 AND BSD-3-Clause"),
    "python3-skimage": ("0.19.3-8", "BSD-3-Clause; photos public domain / CC0 / Middlebury stereo"),
    "python3-sklearn": ("1.2.1+dfsg-1", "BSD-3-Clause; china.jpg, flower.jpg CC-BY-2.0"),
}

# package -> (folder inside the package, photo files under it). Left out on purpose, after looking:
# illustrations and renders (all of ukui-wallpapers, gnome-backgrounds, sway-backgrounds, desktop-base,
# umang, Fossa, Infinite-Sea, Painting-Colors, Volna, PastelHills...), textures (analogpattern, palapeli
# backgrounds), paintings (starry_night), greyscale or synthetic test images, degraded copies
# (text_defocus, licenseplate_motion, ela_modified) and second views of a scene already in (aero3, aloeR).
_PLASMA = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
           "OneStandsOut", "Path", "summer_1am")
PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds", tuple(f"{name}.jpg" for name in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
        "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich",
        "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
        "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi"))),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds", ("Kleiber_by_Lukas_Baubkus.jpg",)),
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature", tuple(f"{name}.jpg" for name in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower"))),
    "palapeli-data": ("usr/share/palapeli/collection", tuple(f"{name}.jpg" for name in (
        "castle-maintenon", "cincinnati-bridge", "citrus-fruits", "european-honey-bee", "panther-chameleon-female"))),
    "plasma-workspace-wallpapers": ("usr/share/wallpapers", tuple(f"{n}/contents/images/2560x1600.jpg"
                                                                  for n in _PLASMA)),
    "opencv-doc": ("usr/share/doc/opencv-doc/examples", (
        *(f"data/{name}" for name in (
            "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg", "butterfly.jpg",
            "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg", "leuvenA.jpg",
            "messi5.jpg", "orange.jpg", "rubberwhale1.png", "squirrel_cls.jpg", "stuff.jpg")),
        "alphamat/input_images/plant.jpg", "dnn_superres/butterfly.png", "hfs/data/000.jpg", "hfs/data/002.jpg",
        "reg/home.png", *(f"text/scenetext0{i}.jpg" for i in range(1, 7)),
        *(f"text/scenetext_segmented_word0{i}.jpg" for i in range(1, 6)))),
    "python3-skimage": ("usr/lib/python3/dist-packages/skimage/data", (
        "astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")),
    "python3-sklearn": ("usr/lib/python3/dist-packages/sklearn/datasets/images", ("china.jpg", "flower.jpg")),
}

TASKS = ("collage", "jpeg_artifacts", "plain_background")
PER_CLASS = {"train": 400, "val": 150, "test": 150}  # images per class: 800 / 300 / 300 per task
SPLIT_CYCLE = ("train", "train", "val", "train", "test")  # 60/20/20, interleaved so each package feeds each split
MAX_SIDE = 1024  # wallpapers are downscaled once, when cached


def photo_id(package: str, path: str) -> str:
    """``package:path-without-extension`` with ``/`` turned into ``-``; unique, readable in the manifest."""
    path = re.sub(r"/contents/images/[^/]+$", "", path)  # a KDE wallpaper's name is its folder
    return f"{package}:{path.rsplit('.', 1)[0].replace('/', '-')}"


def fetch_deb(package: str, debs: Path, packages: dict[str, tuple[str, str]] = PACKAGES) -> Path:
    """The pinned ``.deb`` of ``package`` in ``debs``, downloaded with ``apt-get download`` if missing."""
    version = packages[package][0]
    pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"  # _all or, for a few, the machine's _amd64
    if not list(debs.glob(pattern)):
        debs.mkdir(parents=True, exist_ok=True)
        print(f"download {package}={version}")
        subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=debs, check=True)
    return next(debs.glob(pattern))


def decode(data: bytes) -> np.ndarray:
    """A JPEG or PNG as 8-bit BGR, its longest side at most ``MAX_SIDE``."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    scale = MAX_SIDE / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image


def cache_photos(cache: Path, photos: dict = PHOTOS, packages: dict = PACKAGES) -> dict[str, Path]:
    """Every allow-listed photo decoded, downscaled to ``MAX_SIDE`` and cached as PNG; id -> file."""
    cached: dict[str, Path] = {}
    for package, (folder, files) in photos.items():
        wanted = {f"./{folder}/{path}": photo_id(package, path) for path in files}
        targets = {member: cache / "photos" / f"{pid.replace(':', '__')}.png" for member, pid in wanted.items()}
        cached.update({wanted[m]: t for m, t in targets.items()})
        missing = {m for m, t in targets.items() if not t.exists()}
        if not missing:
            continue
        deb = fetch_deb(package, cache / "debs", packages)
        print(f"decode {len(missing)} photos from {deb.name}")
        # Stream the package's file-system tar: no install and no extracted copy of the whole package.
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.name in missing:
                    targets[member.name].parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(targets[member.name]), decode(tar.extractfile(member).read()))
                    missing.discard(member.name)
        proc.wait()
        if missing:
            raise FileNotFoundError(f"{deb.name} lacks {sorted(missing)}")
    return cached


def split_photos(ids: list[str], seed: int, cycle: tuple[str, ...] = SPLIT_CYCLE) -> dict[str, list[str]]:
    """Each photo to exactly one split: shuffled within its package, then dealt out by ``cycle``."""
    rng = random.Random(seed)
    dealt: list[str] = []
    for _, group in itertools.groupby(sorted(ids), key=lambda pid: pid.split(":")[0]):
        members = list(group)
        rng.shuffle(members)
        dealt += members
    splits: dict[str, list[str]] = {name: [] for name in PER_CLASS}
    for i, pid in enumerate(dealt):
        splits[cycle[i % len(cycle)]].append(pid)
    return {name: sorted(members) for name, members in splits.items()}


def output_size(rng: random.Random) -> tuple[int, int]:
    """(width, height): short side 224-320 px, landscape, square or portrait."""
    short = rng.randint(224, 320)
    aspect = rng.choice((1.0, 4 / 3, 3 / 2, 3 / 4, 2 / 3))
    return (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))


def crop(photo: np.ndarray, w: int, h: int, rng: random.Random, min_frac: float = 0.3) -> np.ndarray:
    """A random ``w`` x ``h`` crop: a region of the photo's aspect-matched maximum, scaled and maybe flipped."""
    ph, pw = photo.shape[:2]
    full = min(pw / w, ph / h)  # the largest crop with the target aspect, in target pixels
    frac = rng.uniform(min_frac, 1.0)
    cw, ch = max(1, round(w * full * frac)), max(1, round(h * full * frac))
    x, y = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
    region = photo[y:y + ch, x:x + cw]
    out = cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA if cw > w else cv2.INTER_CUBIC)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out


def smoothest_crop(photo: np.ndarray, w: int, h: int, rng: random.Random, tries: int = 8) -> np.ndarray:
    """Of ``tries`` random crops the one with the least gradient energy (sky, walls, water) when available."""
    def energy(image: np.ndarray) -> float:
        return float(np.abs(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_32F)).mean())
    return min((crop(photo, w, h, rng) for _ in range(tries)), key=energy)


def collage_layout(rng: random.Random) -> list[tuple[float, float, float, float]]:
    """Tiles as (x0, y0, x1, y1) fractions of the image: 2 side by side, 2 stacked, 2x2, 1 big + 2, 3 in a row."""
    a, b = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
    kind = rng.choice(("side_by_side", "stacked", "grid", "big_small", "three"))
    if kind == "side_by_side":
        return [(0, 0, a, 1), (a, 0, 1, 1)]
    if kind == "stacked":
        return [(0, 0, 1, a), (0, a, 1, 1)]
    if kind == "grid":
        return [(0, 0, a, b), (a, 0, 1, b), (0, b, a, 1), (a, b, 1, 1)]
    if kind == "big_small":
        tiles = [(0, 0, a, 1), (a, 0, 1, b), (a, b, 1, 1)]
    else:
        t0, t1 = rng.uniform(0.25, 0.42), rng.uniform(0.58, 0.75)
        tiles = [(0, 0, t0, 1), (t0, 0, t1, 1), (t1, 0, 1, 1)]
    if rng.random() < 0.5:  # mirror: the big tile on the right
        tiles = [(1 - x1, y0, 1 - x0, y1) for x0, y0, x1, y1 in tiles]
    if rng.random() < 0.4:  # transpose: the big tile on top, or three stacked
        tiles = [(y0, x0, y1, x1) for x0, y0, x1, y1 in tiles]
    return tiles


def make_collage(photos: list[np.ndarray], w: int, h: int, rng: random.Random) -> np.ndarray:
    """2-4 crops tiled in a ``w`` x ``h`` image; half the time with a 2-8 px gap (and sometimes a frame)."""
    gap = rng.randint(2, 8) if rng.random() < 0.5 else 0
    frame = gap if rng.random() < 0.5 else 0
    colour = rng.choice(((255, 255, 255), (0, 0, 0), tuple(rng.randint(0, 255) for _ in range(3))))
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[:] = colour
    tiles = collage_layout(rng)
    # Mostly distinct photos; sometimes one photo's different crops, as in a real photo-set collage.
    sources = [rng.choice(photos)] * len(tiles) if rng.random() < 0.1 else rng.sample(photos, len(tiles))
    for (x0, y0, x1, y1), photo in zip(tiles, sources, strict=True):
        left = round(x0 * w) + (gap // 2 if x0 > 0 else frame)
        right = round(x1 * w) - (gap - gap // 2 if x1 < 1 else frame)
        top = round(y0 * h) + (gap // 2 if y0 > 0 else frame)
        bottom = round(y1 * h) - (gap - gap // 2 if y1 < 1 else frame)
        canvas[top:bottom, left:right] = crop(photo, right - left, bottom - top, rng, min_frac=0.2)
    return canvas


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def make_jpeg(photo: np.ndarray, w: int, h: int, rng: random.Random, heavy: bool) -> np.ndarray:
    """Crop at a random scale, compress (heavy: q 5-20, clean: q 90-98), then maybe rescale to ``w`` x ``h``.

    Rescaling after compression in half the images moves the 8x8 block grid off the final one, so a model
    must see the artefacts, not count block boundaries or read quantisation tables.
    """
    scale = rng.uniform(0.6, 1.5) if rng.random() < 0.5 else 1.0
    sw, sh = max(64, round(w * scale)), max(64, round(h * scale))
    image = jpeg_roundtrip(crop(photo, sw, sh, rng), rng.randint(5, 20) if heavy else rng.randint(90, 98))
    if (sw, sh) != (w, h):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if sw > w else cv2.INTER_LINEAR)
    return image


def plain_background(w: int, h: int, rng: random.Random) -> np.ndarray:
    """White, near-white or light pastel; sometimes a gentle vertical gradient (studio sweep) and sensor noise."""
    kind = rng.random()
    if kind < 0.4:
        base = np.array([255.0, 255.0, 255.0])
    elif kind < 0.7:
        grey = rng.uniform(232, 252)
        base = np.array([grey + rng.uniform(-4, 4) for _ in range(3)])  # a faint tint
    else:  # pastel: a random hue, low saturation, high value
        hsv = np.uint8([[[rng.randint(0, 179), rng.randint(20, 70), rng.randint(225, 255)]]])
        base = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(float)
    ramp = np.linspace(0, rng.uniform(-25, 10), h) if rng.random() < 0.5 else np.zeros(h)
    background = np.broadcast_to(base + ramp[:, None, None], (h, w, 3)).copy()
    if rng.random() < 0.4:
        background += np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0.5, 2.5), (h, w, 3))
    return np.clip(background, 0, 255)


def make_product(photo: np.ndarray, w: int, h: int, rng: random.Random) -> np.ndarray:
    """A photo crop (rectangle, rounded rectangle or ellipse; 40-80 % of the short side) on a plain background."""
    canvas = plain_background(w, h, rng)
    side = rng.uniform(0.4, 0.8) * min(w, h)
    aspect = rng.uniform(0.7, 1.4)
    ow, oh = round(side * aspect**0.5), round(side / aspect**0.5)
    x = round((w - ow) * rng.uniform(0.25, 0.75))
    y = round((h - oh) * rng.uniform(0.2, 0.8))
    mask = np.zeros((h, w), np.float32)
    shape = rng.choice(("rect", "rounded", "ellipse"))
    if shape == "ellipse":
        cv2.ellipse(mask, (x + ow // 2, y + oh // 2), (ow // 2, oh // 2), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    else:
        r = round(min(ow, oh) * rng.uniform(0.08, 0.25)) if shape == "rounded" else 0
        cv2.rectangle(mask, (x + r, y), (x + ow - 1 - r, y + oh - 1), 1.0, -1)
        cv2.rectangle(mask, (x, y + r), (x + ow - 1, y + oh - 1 - r), 1.0, -1)
        for cx in (x + r, x + ow - 1 - r):
            for cy in (y + r, y + oh - 1 - r):
                cv2.circle(mask, (cx, cy), r, 1.0, -1, cv2.LINE_AA)
    if rng.random() < 0.5:  # soft drop shadow, offset down and to one side
        shift = np.float32([[1, 0, rng.uniform(-0.05, 0.05) * w], [0, 1, rng.uniform(0.01, 0.06) * h]])
        shadow = cv2.GaussianBlur(cv2.warpAffine(mask, shift, (w, h)), (0, 0), rng.uniform(3, 10))
        canvas *= 1 - rng.uniform(0.15, 0.45) * shadow[..., None]
    item = np.zeros((h, w, 3), np.float32)
    item[y:y + oh, x:x + ow] = crop(photo, ow, oh, rng)
    alpha = mask[..., None]
    return np.clip(canvas * (1 - alpha) + item * alpha, 0, 255).astype(np.uint8)


def make_image(task: str, positive: bool, photos: list[np.ndarray], rng: random.Random) -> np.ndarray:
    """One image of ``task``: a positive or a normal, from the given split's photos only."""
    w, h = output_size(rng)
    photo = rng.choice(photos)
    if task == "collage":
        return make_collage(photos, w, h, rng) if positive else crop(photo, w, h, rng)
    if task == "jpeg_artifacts":
        return make_jpeg(photo, w, h, rng, heavy=positive)
    if positive:
        return make_product(photo, w, h, rng)
    return smoothest_crop(photo, w, h, rng) if rng.random() < 0.33 else crop(photo, w, h, rng)


def build(out: Path, cache: Path, seed: int) -> dict:
    """Fetch, split and generate everything missing under ``out``; returns the manifest."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text())["seed"] != seed:
        raise SystemExit(f"{out} was built with another seed; pick another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps({"seed": seed, "complete": False}))
    files = cache_photos(cache)
    splits = split_photos(list(files), seed)
    print("photos per split: " + ", ".join(f"{name} {len(ids)}" for name, ids in splits.items()))
    loaded = {pid: cv2.imread(str(path), cv2.IMREAD_COLOR) for pid, path in files.items()}
    manifest: dict = {
        "seed": seed,
        "packages": [{"name": n, "version": v, "licence": lic} for n, (v, lic) in PACKAGES.items()],
        "tasks": {},
    }
    for task in TASKS:
        manifest["tasks"][task] = {}
        for split, ids in splits.items():
            photos = [loaded[pid] for pid in ids]
            made, counts = 0, {}
            for label in ("positive", "normal"):
                folder = out / task / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(PER_CLASS[split]):
                    path = folder / f"{i:04d}.jpg"
                    if path.exists():
                        continue
                    # One generator per image: reruns and partial runs give the same file as a clean run.
                    rng = random.Random(f"{seed}/{task}/{split}/{label}/{i}")
                    image = make_image(task, label == "positive", photos, rng)
                    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
                    made += 1
                counts[label] = len(list(folder.glob("*.jpg")))
            manifest["tasks"][task][split] = {"counts": counts, "photos": ids}
            print(f"{task}/{split}: made {made}, now {counts}")
    manifest["complete"] = True
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("work_dirs/real_photos"))
    parser.add_argument("--cache", type=Path, default=Path("work_dirs/real_photos_cache"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    manifest = build(args.out, args.cache, args.seed)
    took = time.time() - start
    print(f"\n{len(manifest['packages'])} packages, seed {args.seed}, {took:.0f} s; written to {args.out}")
    for task, splits in manifest["tasks"].items():
        cells = [f"{s} {c['counts']['positive']}+{c['counts']['normal']} ({len(c['photos'])} photos)"
                 for s, c in splits.items()]
        print(f"  {task:17s} " + ", ".join(cells))


if __name__ == "__main__":
    main()
