"""The data-cleaning filter (waterdrop.curation.cleaning) on real photographs with planted problems.

    python benchmarks/real_photos.py        # builds work_dirs/real_photos once
    python benchmarks/cleaning.py [--photos work_dirs/real_photos] [--task jpeg_artifacts] [--per-class N]
                                  [--out work_dirs/cleaning_bench] [--seed 0]

One task's train / val / test folders (``<split>/{normal,positive}/*.jpg``) are copied to
``OUT/data``; then, with a fixed seed, known problems are planted in the copy: uniform borders
(white, black, near-white, near-black, grey; frames, letterboxes, pillarboxes, uneven; 4-48 px;
saved as JPEG q90) and tiny images replace some photos; exact copies and near copies (rescaled
0.6-0.95 and re-encoded at JPEG q40-85) are added within a split and from train into test; and
truncated, zero-byte, text and random-byte files are added. The cleaner runs on the three splits
(train val test) and every flag is checked against the plants. A flag on an image that was not
planted is counted as a false positive, by kind. benchmarks/real_photos.py cuts several images
from each source photograph of a split, so near duplicates among unplanted images of one split
can be genuine (look at OUT/clean/duplicates.png); across splits the photographs differ by
construction, so every cross-split pair among unplanted images is a false positive. A sweep of
the pHash distance shows where the default threshold sits. Writes OUT/report.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
from cpu_usage import cpu_model

from waterdrop.curation.cleaning import clean, hamming, phash
from waterdrop.imageio import list_images, read_image

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
COUNTS = {"border": 24, "tiny": 10, "exact": 12, "near": 24, "leak_exact": 8, "leak_near": 12}


def machine() -> str:
    return f"{os.cpu_count()}-core {cpu_model()}, CPU only"


def write(path: Path, image: np.ndarray, quality: int = 90) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])


def near_copy(image: np.ndarray, rng: random.Random) -> np.ndarray:
    scale = rng.uniform(0.6, 0.95)
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, rng.randint(40, 85)])[1]
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)


def add_border(image: np.ndarray, rng: random.Random) -> tuple[np.ndarray, str]:
    colour = rng.choice([(255, 255, 255), (0, 0, 0), (248, 248, 248), (12, 12, 12), (128, 128, 128)])
    width = rng.choice([4, 8, 16, 32, 48])
    style = rng.choice(["frame", "letterbox", "pillarbox", "uneven"])
    if style == "uneven":  # top, bottom, left, right
        sides = [rng.choice([0, 8, 16, 32]) for _ in range(3)] + [width]
    else:
        sides = {"frame": [width] * 4, "letterbox": [width, width, 0, 0], "pillarbox": [0, 0, width, width]}[style]
    return cv2.copyMakeBorder(image, *sides, cv2.BORDER_CONSTANT, value=colour), f"{style} {width}px {colour[0]}"


def plant(data: Path, rng: random.Random) -> list[dict]:
    """Plants the problems into the copy; one dict per plant: its kind, the file that must be
    flagged (``file``), the file it duplicates (``partner``) and, for borders, the photo's size."""
    pool = [p for split in SPLITS for p in list_images(data / split)]
    rng.shuffle(pool)
    changed = COUNTS["border"] + COUNTS["tiny"]
    sources = iter(pool[changed : changed + COUNTS["exact"] + COUNTS["near"]])
    train = iter(p for p in pool[changed + COUNTS["exact"] + COUNTS["near"] :] if p.parts[-3] == "train")
    plants = []
    for path in pool[: COUNTS["border"]]:
        image = read_image(path)
        bordered, note = add_border(image, rng)
        write(path, bordered)
        plants.append({"kind": "border", "file": path, "size": image.shape[:2], "note": note})
    for path in pool[COUNTS["border"] : changed]:
        size = rng.randint(24, 59), rng.randint(24, 59)
        write(path, cv2.resize(read_image(path), size, interpolation=cv2.INTER_AREA))
        plants.append({"kind": "tiny", "file": path})
    for kind in ("exact", "near"):
        for n in range(COUNTS[kind]):
            source = next(sources)
            copy = source.with_name(f"{kind}_copy_{n:02d}.jpg")  # sorts after the digits: the copy is the later one
            if kind == "exact":
                shutil.copyfile(source, copy)
            else:
                write(copy, near_copy(read_image(source), rng))
            plants.append({"kind": kind, "file": copy, "partner": source})
    for kind in ("leak_exact", "leak_near"):
        for n in range(COUNTS[kind]):
            source = next(train)
            leak = data / "test" / source.parent.name / f"{kind}_{n:02d}.jpg"
            if kind == "leak_exact":
                shutil.copyfile(source, leak)
            else:
                write(leak, near_copy(read_image(source), rng))
            plants.append({"kind": kind, "file": source, "partner": leak})  # the train copy must go
    jpeg = pool[-1].read_bytes()
    bad = {"truncated": jpeg[: len(jpeg) // 2], "zero-byte": b"", "text": b"not an image\n"}
    bad["random bytes"] = bytes(rng.getrandbits(8) for _ in range(5000))
    for n in range(12):
        what = list(bad)[n % len(bad)]
        path = data / rng.choice(SPLITS) / rng.choice(["normal", "positive"]) / f"bad_{n:02d}.jpg"
        path.write_bytes(bad[what])
        plants.append({"kind": "undecodable", "file": path, "note": what})
    return plants


def score(plants: list[dict], report) -> list[str]:
    """Markdown rows: planted vs found per kind."""
    flags = {}
    for flag in report.flags:
        flags.setdefault(flag.image, []).append(flag)
    titles = {
        "undecodable": "undecodable (truncated, zero-byte, text, random bytes)",
        "tiny": "too small (under 3600 px)",
        "border": "uniform border (white/black/grey, 4-48 px, JPEG q90)",
        "exact": "exact duplicate, within a split",
        "near": "near duplicate, within a split (x0.6-0.95, JPEG q40-85)",
        "leak_exact": "exact duplicate, train -> test",
        "leak_near": "near duplicate, train -> test",
    }
    reasons = {"exact": "exact_duplicate", "near": "near_duplicate", "leak_exact": "exact_duplicate"}
    reasons |= {"leak_near": "near_duplicate", "tiny": "too_small", "undecodable": "undecodable", "border": "trimmed"}
    rows = ["| planted problem | planted | found | missed | notes |", "|---|---:|---:|---:|---|"]
    for kind, title in titles.items():
        mine = [p for p in plants if p["kind"] == kind]
        found, notes, errors = 0, [], []
        for p in mine:
            hits = [f for f in flags.get(str(p["file"]), []) if f.reason == reasons[kind]]
            if "partner" in p:
                hits = [f for f in hits if f.duplicate_of == str(p["partner"])]
            if kind == "border" and hits:
                copy = read_image(hits[0].copy).shape[:2]
                errors.append(max(abs(a - b) for a, b in zip(copy, p["size"])))
                hits = hits if errors[-1] <= 8 else []
            found += bool(hits)
            if not hits and kind == "border":
                notes.append(f"missed: {p['note']}")
        if kind == "border":
            notes.insert(0, f"{sum(e <= 1 for e in errors)} of {len(mine)} within 1 px of the photo's size")
        if kind.startswith("leak"):
            notes.append("train copy dropped, test copy kept" if found == len(mine) else "")
        rows.append(f"| {title} | {len(mine)} | {found} | {len(mine) - found} | {'; '.join(n for n in notes if n)} |")
    return rows


def false_positives(plants: list[dict], report, originals: int, data: Path) -> list[str]:
    """Markdown rows: flags on images that were not planted, by kind, then each of them."""
    planted = {str(p["file"]) for p in plants} | {str(p.get("partner")) for p in plants}
    extra = [f for f in report.flags if f.image not in planted]
    cross = [f for f in extra if f.duplicate_split not in (None, f.split)]
    kinds = {
        "trimmed, no border planted (a uniform edge of the image itself)": [f for f in extra if f.reason == "trimmed"],
        "too small / undecodable": [f for f in extra if f.reason in ("too_small", "undecodable")],
        "near duplicate within a split (crops of one source photograph: may be genuine)": [
            f for f in extra if f.duplicate_split == f.split
        ],
        "... of which labelled differently (normal vs positive)": [f for f in extra if "labels differ" in f.message],
        "duplicate across splits of a planted leak (another crop of the leaked photograph)": [
            f for f in cross if f.duplicate_of in planted
        ],
        "duplicate across splits, both unplanted (different photographs: false)": [
            f for f in cross if f.duplicate_of not in planted
        ],
    }
    rows = [f"| flag on an unplanted image (of {originals}) | count |", "|---|---:|"]
    rows += [f"| {kind} | {len(found)} |" for kind, found in kinds.items()]
    rows += ["", "Each of them (paths under the copied data):", ""] + ([] if extra else ["- none"])
    for f in extra:
        partner = f" of {os.path.relpath(f.duplicate_of, data)}, distance {f.distance}" if f.duplicate_of else ""
        rows.append(f"- {os.path.relpath(f.image, data)}: {f.reason}{partner} {f.message}".rstrip())
    return rows


def sweep(plants: list[dict], data: Path) -> list[str]:
    """Markdown rows: planted near pairs found and pairs among unplanted photos, per pHash distance."""
    changed = {p["file"] for p in plants if p["kind"] in ("border", "tiny")}
    paths = [
        p
        for split in SPLITS
        for p in list_images(data / split)
        if p not in changed and not p.name.startswith(("exact_", "near_", "leak_", "bad_"))
    ]
    hashes = np.array([phash(read_image(p)) for p in paths], dtype=np.uint64)
    splits = np.array([p.parts[-3] for p in paths])
    distances = np.stack([hamming(h, hashes) for h in hashes])
    upper = np.triu(np.ones_like(distances, dtype=bool), 1)
    same = splits[:, None] == splits[None]
    planted = [
        int(hamming(phash(read_image(p["file"])), phash(read_image(p["partner"])))[0])
        for p in plants
        if p["kind"] in ("near", "leak_near")
    ]
    rows = [
        f"| pHash distance <= | planted near pairs found (of {len(planted)}) | pairs within a split "
        "(unplanted) | pairs across splits (unplanted, false) |",
        "|---:|---:|---:|---:|",
    ]
    for limit in (2, 4, 6, 8, 10, 12, 14):
        close = upper & (distances <= limit)
        rows.append(
            f"| {limit} | {sum(d <= limit for d in planted)} | {int((close & same).sum())} | "
            f"{int((close & ~same).sum())} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=REPO / "work_dirs/real_photos")
    parser.add_argument("--task", default="jpeg_artifacts")
    parser.add_argument("--per-class", type=int, help="images per class and split to copy (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs/cleaning_bench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(os.path.abspath(args.out))
    for folder in (out / "data", out / "clean"):  # this script's own scratch folders
        shutil.rmtree(folder, ignore_errors=True)
    for split in SPLITS:
        for label in ("normal", "positive"):
            (out / "data" / split / label).mkdir(parents=True)
            for path in list_images(args.photos / args.task / split / label)[: args.per_class]:
                shutil.copyfile(path, out / "data" / split / label / path.name)
    originals = sum(len(list_images(out / "data" / split)) for split in SPLITS)
    plants = plant(out / "data", random.Random(args.seed))
    report = clean([(split, out / "data" / split) for split in SPLITS], out / "clean")
    images = sum(counts["images"] for counts in report.splits.values())
    lines = [
        "# Data cleaning on real photographs with planted problems",
        "",
        f"`python benchmarks/cleaning.py --task {args.task} --seed {args.seed}`: {originals} photographs of "
        f"`{args.task}` (train / val / test), {len(plants)} planted problems, {images} files in all. "
        f"Defaults: min_pixels {report.settings['min_pixels']}, border_tolerance "
        f"{report.settings['border_tolerance']}, near_distance {report.settings['near_distance']}.",
        "",
        *score(plants, report),
        "",
        *false_positives(plants, report, originals - COUNTS["border"] - COUNTS["tiny"], out / "data"),
        "",
        *sweep(plants, out / "data"),
        "",
        f"Wall time of the cleaner: {report.seconds:.1f} s for {images} files ({images / report.seconds:.0f} "
        f"images/s), one process, on {machine()}.",
        "",
        "Counts per split:",
        "",
        "```",
        report.summary(),
        "```",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
