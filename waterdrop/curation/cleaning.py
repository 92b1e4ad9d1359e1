"""Data cleaning before training: undecodable files, tiny images, uniform borders, duplicates.

Give a task's splits together, in the order ``train val test``: a photograph that sits in train
and in test inflates every test metric. The user's files are never changed; the output folder
gets one cleaned JSONL manifest per split, trimmed copies and ``report.json``. Per image:

1. ``undecodable``: ``waterdrop.imageio.read_image`` refuses it, as training would (corrupt,
   truncated, empty, not an image, over the pixel limit); ``bad_line``: a manifest line that is
   not a JSON object with an ``image`` path.
2. ``trimmed`` (kept): uniform borders (see ``border_box``) are cut off into a PNG copy, as a
   JPEG re-encode would add artefacts of its own.
3. ``too_small``: under ``min_pixels`` pixels once trimmed (a uniform image has none left).
4. ``exact_duplicate`` (the same pixels once trimmed) and ``near_duplicate`` (64-bit DCT pHash,
   Zauner 2010, at most ``near_distance`` bits apart).

Which copy goes: images are taken splits last-given first, each split in listing order, and an
image is dropped when it duplicates one already kept. So within a split the first copy stays,
and across splits the copy in the earlier-given split goes: with ``train val test`` a leak
leaves train, and test stays whole.

Near duplicates are found by multi-index hashing (Norouzi et al., 2012): two hashes at most d
bits apart agree to within d // 4 bits on one of their four 16-bit bands (pigeonhole), so
looking up each band's values within that many bits finds every pair without comparing all
pairs. Only hashes and digests stay in memory, never images. Findings are ``Flag`` rows with a
free-form ``reason``, so other checks (loss-based outliers) can add theirs to the report.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from waterdrop.curation.contact_sheet import contact_sheet
from waterdrop.imageio import ImageDecodeError, read_image
from waterdrop.progress import Progress
from waterdrop.records import read_lines

REASONS = ("bad_line", "undecodable", "too_small", "exact_duplicate", "near_duplicate", "trimmed")
_BANDS = 4  # 16-bit bands of the 64-bit hash
_FLAT = 3  # grey levels: the spread of a padded border's outer line (a sky's is larger)
_RINGING = 8  # lines: one JPEG block of ringing between a border and the content
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


@dataclass
class Flag:
    """One finding about one image; ``dropped`` False means it stays (as a trimmed ``copy``)."""

    split: str
    image: str
    reason: str
    dropped: bool = True
    message: str = ""
    duplicate_of: str | None = None
    duplicate_split: str | None = None
    distance: int | None = None
    pixel_difference: float | None = None  # near duplicates: see ``thumbnail_difference``
    copy: str | None = None


@dataclass
class CleaningReport:
    """Counts per split (``images``, ``kept``, ``cross_split`` and one per reason) and every flag."""

    splits: dict[str, dict[str, int]]
    flags: list[Flag] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)
    contact_sheet: str | None = None
    seconds: float = 0.0

    def add(self, flag: Flag) -> None:
        self.flags.append(flag)
        counts = self.splits[flag.split]
        counts[flag.reason] = counts.get(flag.reason, 0) + 1
        if flag.duplicate_split not in (None, flag.split):
            counts["cross_split"] = counts.get("cross_split", 0) + 1

    def to_json(self) -> dict:
        return {**asdict(self), "flags": [{k: v for k, v in asdict(f).items() if v is not None} for f in self.flags]}

    def summary(self) -> str:
        """The counts as a table, one row per split, then where the outputs are."""
        present = {key for counts in self.splits.values() for key in counts} - {"images", "kept", "cross_split"}
        columns = ["images", "kept", *(r for r in REASONS if r in present), *sorted(present - set(REASONS))]
        head = ["split", *columns, "cross_split"]
        rows = [head] + [[name, *(str(counts.get(key, 0)) for key in head[1:])] for name, counts in self.splits.items()]
        width = max(len(row[0]) for row in rows)
        lines = [row[0].ljust(width) + "".join(f"{c:>{len(h) + 2}}" for c, h in zip(row[1:], head[1:])) for row in rows]
        lines.append("cross_split: dropped as copies of images kept in a later-given split")
        conflicts = sum("labels differ" in flag.message for flag in self.flags)
        if conflicts:
            lines.append(f"{conflicts} duplicate(s) labelled unlike the image kept: look at them in report.json")
        unlike = [f for f in self.flags if (f.pixel_difference or 0) > LOOKS_DIFFERENT]
        if unlike:
            lines.append(f"{len(unlike)} near-duplicate pair(s) look unlike each other: their thumbnails differ by "
                         f"more than {LOOKS_DIFFERENT:.0f} grey levels (pixel_difference in report.json). Either a "
                         "crop of the same photo, or different images whose pHashes agree, as happens on smooth, "
                         "low-detail images; look at duplicates.png, and if they are different images lower "
                         f"--near-distance (now {self.settings.get('near_distance')}) or use --exact-only")
        if self.settings.get("unlabelled"):
            lines.append("unlabelled: the folders' rows carry no labels (an unlabelled pool, not negatives)")
        lines += [f"{name}: {path}" for name, path in self.manifests.items()]
        if self.contact_sheet:
            lines.append(f"duplicate pairs to look at: {self.contact_sheet}")
        lines.append(f"{sum(c['images'] for c in self.splits.values())} images in {self.seconds:.1f} s")
        return "\n".join(lines)


@dataclass
class _Image:
    split: int
    item: dict
    box: tuple[int, int, int, int]  # top, bottom, left, right of the kept area
    shape: tuple[int, int]
    digest: bytes
    phash: int


def _uniform_run(lines: np.ndarray, tolerance: int, chunk: int = 64) -> tuple[int, float | None]:
    """(how many leading lines of a grey int16 array lie within ``tolerance`` of the outermost
    line's median, that median); (0, None) when the outermost line is not flat."""
    if lines.size == 0:
        return len(lines), None
    low, high = np.percentile(lines[0], [5, 95])
    if high - low > _FLAT:
        return 0, None
    grey = float(np.median(lines[0]))
    for start in range(0, len(lines), chunk):  # chunks: a thin border is found without reading the whole image
        uniform = (np.abs(lines[start : start + chunk] - grey) <= tolerance).all(axis=1)
        if not uniform.all():
            return start + int(np.argmin(uniform)), grey
    return len(lines), grey


def _edge(lines: np.ndarray, run: int, grey: float | None, tolerance: int) -> int:
    """The border's width: ``run`` lines and the ringing up to the first line that is mostly
    off ``grey`` (0 when none follows within ``_RINGING`` lines)."""
    if grey is None:
        return 0
    hits = np.nonzero((np.abs(lines[run : run + _RINGING] - grey) > tolerance).mean(axis=1) >= 0.5)[0]
    return run + int(hits[0]) if len(hits) else 0


def border_box(image: np.ndarray, tolerance: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of an RGB image inside its uniform borders; (0, 0, 0, 0) when
    nothing is left.

    A side has a border when its outermost line is flat in grey (5-95 % spread at most ``_FLAT``),
    the lines after it lie within ``tolerance`` of that grey, and a line that is mostly content
    (within the other sides' borders) follows within ``_RINGING`` lines; those lines are JPEG
    ringing and go with the border. Padding is flat and ends in a straight edge; a sky or a dark
    background that fades into the scene is not flat or has no such edge, so it stays. Grey, not
    colour, because JPEG's half-resolution colour rings up to 16 pixels into a border.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.int16)
    height, width = grey.shape
    top, top_grey = _uniform_run(grey, tolerance)
    bottom, bottom_grey = _uniform_run(grey[top:][::-1], tolerance)
    rows = grey[top : height - bottom].T  # the sides are looked at on the rows between top and bottom
    left, left_grey = _uniform_run(rows, tolerance)
    right, right_grey = _uniform_run(rows[left:][::-1], tolerance)
    if top + bottom >= height or left + right >= width:
        return 0, 0, 0, 0
    columns = grey[:, left : width - right]
    top, bottom = _edge(columns, top, top_grey, tolerance), _edge(columns[::-1], bottom, bottom_grey, tolerance)
    rows = grey[top : height - bottom].T
    left, right = _edge(rows, left, left_grey, tolerance), _edge(rows[::-1], right, right_grey, tolerance)
    return (top, height - bottom, left, width - right) if top + bottom < height and left + right < width else (0,) * 4


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB image: the 8 x 8 lowest frequencies of the grey image
    at 32 x 32, each compared to their median (the DC term's bit is always set)."""
    small = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small.astype(np.float32))[:8, :8].ravel()
    return int(np.packbits(low > np.median(low[1:])).view(">u8")[0])


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bit distances between 64-bit hashes, elementwise."""
    xor = np.atleast_1d(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
    if hasattr(np, "bitwise_count"):  # numpy 2; the runtime install allows 1.26, which counts by table
        return np.bitwise_count(xor).astype(np.int64)
    return _POPCOUNT[xor.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64)


def close_pairs(hashes: np.ndarray, distance: int, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j), i > j, of ``hashes`` at most ``distance`` bits apart, and their distances.

    Multi-index hashing (see the module docstring): for each 16-bit band and each change of at
    most ``distance // 4`` of its bits, every hash looks up, through a table of where each band
    value starts in the sorted band, the hashes whose band has the changed value; only those
    candidates are compared, in numpy.
    """
    values = np.arange(1 << 16, dtype=np.uint16)
    masks = values[_POPCOUNT[values.view(np.uint8)].reshape(-1, 2).sum(axis=1) <= distance // _BANDS]
    found = [np.zeros((0, 2), dtype=np.int64)]
    for band in range(_BANDS):
        keys = ((hashes >> np.uint64(16 * band)) & np.uint64(0xFFFF)).astype(np.uint16)
        order = np.argsort(keys, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=1 << 16))])  # where each value begins
        for mask, start in itertools.product(masks, range(0, len(keys), chunk)):  # chunks bound the memory
            probes = (keys[start : start + chunk] ^ mask).astype(np.int64)
            low, high = starts[probes], starts[probes + 1]
            counts = high - low  # the ranges low..high, joined without a Python loop over them
            first = start + np.repeat(np.arange(len(probes)), counts)
            second = order[np.repeat(low - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())]
            close = (first > second) & (hamming(hashes[first], hashes[second]) <= distance)
            found.append(np.stack([first[close], second[close]], axis=1))
    pairs = np.unique(np.concatenate(found), axis=0)  # a pair close on several bands is found on each
    return pairs, hamming(hashes[pairs[:, 0]], hashes[pairs[:, 1]])


def _find_duplicates(images: list[_Image], near_distance: int | None) -> list[tuple[int, int, int]]:
    """(dropped, kept, distance) indexes into ``images``, by the priority rule of the module docstring;
    distance -1 is an exact duplicate. ``near_distance`` None looks for exact duplicates only."""
    order = sorted(range(len(images)), key=lambda i: (-images[i].split, i))
    seen, unique = set(), []  # the first rank of each digest: a flood of equal images is one hash
    for rank, i in enumerate(order):
        if images[i].digest not in seen:
            seen.add(images[i].digest)
            unique.append(rank)
    neighbours = [[] for _ in order]  # per rank: (distance, earlier rank) of its near duplicates
    if near_distance is not None and unique:
        pairs, distances = close_pairs(np.array([images[order[r]].phash for r in unique], np.uint64), near_distance)
        for (later, earlier), distance in zip(pairs.tolist(), distances.tolist()):
            neighbours[unique[later]].append((distance, unique[earlier]))
    decided, kept, found = {}, set(), []  # decided: digest -> (image it duplicates, distance)
    for rank, i in enumerate(order):
        if images[i].digest in decided:  # the same pixels again: the same fate as their first copy
            found.append((i, *decided[images[i].digest]))
            continue
        near = min(((d, r) for d, r in neighbours[rank] if r in kept), default=None)
        if near is None:
            kept.add(rank)
            decided[images[i].digest] = (i, -1)
        else:
            found.append((i, order[near[1]], near[0]))
            decided[images[i].digest] = (order[near[1]], near[0])
    return found


def _scan(name: str, split: int, source: Path, report: CleaningReport, min_pixels: int,
          border_tolerance: int | None, unlabelled: bool, meter: Progress) -> Iterator[_Image]:
    """Decode, trim and hash one split's images, one at a time; problems go to ``report``."""
    for item, problem in read_lines(source, unlabelled):
        report.splits[name]["images"] += 1
        meter.update(1, failed=item is None)
        if item is None:
            report.add(Flag(name, problem.split(": ")[0], "bad_line", message=problem))
            continue
        try:
            image = read_image(item["image"])
        except ImageDecodeError as err:
            report.add(Flag(name, item["image"], "undecodable", message=str(err)))
            meter.update(0, failed=1)
            continue
        shape = image.shape[:2]
        box = (0, shape[0], 0, shape[1]) if border_tolerance is None else border_box(image, border_tolerance)
        image = np.ascontiguousarray(image[box[0] : box[1], box[2] : box[3]])
        if image.shape[0] * image.shape[1] < max(min_pixels, 1):  # a uniform image has nothing left
            trimmed = " once trimmed" if image.shape[:2] != shape else ""
            report.add(Flag(name, item["image"], "too_small", message=f"{image.shape[1]} x {image.shape[0]}{trimmed}"))
            continue
        digest = hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).digest()
        yield _Image(split, item, box, shape, digest, phash(image))


def thumbnail_difference(a: _Image, b: _Image, side: int = 32) -> float:
    """Mean absolute difference (grey levels, 0-255) of two images' trimmed grey thumbnails.

    pHash keeps only the signs of 63 low-frequency coefficients, so on smooth, low-detail
    images (gradients, plain backgrounds, synthetic data) different images can share most of
    them; this says how alike a near-duplicate pair looks. Measured: a re-encoded or resized
    copy differs by under 1 level; a crop of 5 % per side by 3 to 6 on demo images and 27 on a
    detailed photograph; the demo's flagged cross-split pairs, different images, by 30 to 111.
    """
    def thumbnail(image: _Image) -> np.ndarray:
        top, bottom, left, right = image.box
        pixels = cv2.cvtColor(read_image(image.item["image"])[top:bottom, left:right], cv2.COLOR_RGB2GRAY)
        return cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)

    return round(float(np.abs(thumbnail(a) - thumbnail(b)).mean()), 1)


LOOKS_DIFFERENT = 20.0  # grey levels of thumbnail difference above which a pHash match is suspect


def _keep(image: _Image, name: str, out: Path, number: int, report: CleaningReport) -> dict:
    """The manifest line of a kept image, pointed at a trimmed copy (written now) where it has borders."""
    top, bottom, left, right = image.box
    if image.box == (0, image.shape[0], 0, image.shape[1]):
        return image.item
    copy = out / "trimmed" / name / f"{number:06d}_{Path(image.item['image']).stem}.png"
    copy.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(copy), cv2.cvtColor(read_image(image.item["image"])[top:bottom, left:right], cv2.COLOR_RGB2BGR))
    size = f"{image.shape[1]} x {image.shape[0]} -> {right - left} x {bottom - top}"
    report.add(Flag(name, image.item["image"], "trimmed", dropped=False, message=size, copy=os.path.abspath(copy)))
    return {**image.item, "image": os.path.abspath(copy), "trimmed_from": image.item["image"]}


def clean(
    sources: list[tuple[str, Path]],
    out: Path,
    min_pixels: int = 3600,
    border_tolerance: int | None = 8,
    near_distance: int | None = 8,
    sheet_pairs: int = 8,
    unlabelled: bool = False,
) -> CleaningReport:
    """Check every image of every split and write the cleaned manifests, copies and report to ``out``.

    Args:
        sources: (split name, folder or JSONL manifest) in the order ``train val test``: a
            duplicate across splits is dropped from the earlier-given split.
        out: output folder (created): ``<split>.jsonl`` with absolute image paths, ``trimmed/``,
            ``report.json`` and ``duplicates.png``.
        min_pixels: smaller images (width x height, after trimming) are dropped.
        border_tolerance: largest grey difference (0-255) from a side's border colour for a
            line to count as border; None keeps images untrimmed.
        near_distance: largest pHash bit distance of a near duplicate; None: exact ones only.
        sheet_pairs: duplicate pairs drawn in ``duplicates.png`` (0: no sheet).
        unlabelled: folders are unlabelled pools: their rows get no ``labels`` key. Without
            it a folder must hold one folder per label.

    Returns:
        The report, also written to ``out / "report.json"``.

    Raises:
        ValueError: a split name that is repeated or not a plain file name, a source that is
            neither a folder nor a ``.jsonl`` file, a folder with images outside label folders
            (unless ``unlabelled``), or ``near_distance`` outside 0-63.
    """
    start = time.perf_counter()
    names = [name for name, _ in sources]
    for name in names:
        if names.count(name) > 1 or not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"split name {name!r} is repeated or not a plain name; give each source as NAME=PATH")
    if near_distance is not None and not 0 <= near_distance < 64:
        raise ValueError(f"near_distance {near_distance}: a pHash distance is 0-63 bits")
    settings = {"min_pixels": min_pixels, "border_tolerance": border_tolerance, "near_distance": near_distance}
    settings["sources"] = {name: str(source) for name, source in sources}
    settings["unlabelled"] = unlabelled
    report = CleaningReport({name: {"images": 0, "kept": 0} for name in names}, settings=settings)
    images = []
    with Progress("clean") as meter:
        for split, (name, source) in enumerate(sources):
            images += _scan(name, split, Path(source), report, min_pixels, border_tolerance, unlabelled, meter)
    dropped = set()
    for i, k, distance in _find_duplicates(images, near_distance):
        this, other = images[i], images[k]
        labels = this.item.get("labels"), other.item.get("labels")
        differ = f"labels differ: {labels[0]} vs {labels[1]}" if labels[0] != labels[1] else ""
        reason = "exact_duplicate" if distance < 0 else "near_duplicate"
        pair = dict(duplicate_of=other.item["image"], duplicate_split=names[other.split], distance=max(distance, 0))
        if distance >= 0:
            pair["pixel_difference"] = thumbnail_difference(this, other)
        report.add(Flag(names[this.split], this.item["image"], reason, message=differ, **pair))
        dropped.add(i)
    out.mkdir(parents=True, exist_ok=True)
    manifests = {name: [] for name in names}
    for i, image in enumerate(images):
        if i not in dropped:
            name = names[image.split]
            manifests[name].append(_keep(image, name, out, len(manifests[name]), report))
            report.splits[name]["kept"] += 1
    for name, items in manifests.items():
        report.manifests[name] = str(out / f"{name}.jsonl")
        Path(report.manifests[name]).write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    # Near duplicates first, the most distant first: that is where the threshold may be wrong.
    pairs = sorted((f for f in report.flags if f.duplicate_of), key=lambda f: (f.reason[0] == "e", -f.distance))
    if pairs and sheet_pairs > 0:  # one row per pair: the dropped image, then the one it duplicates
        paths, captions = [], []
        for f in pairs[:sheet_pairs]:
            paths += [f.image, f.duplicate_of]
            apart = f"{f.distance} bits" + (f", {f.pixel_difference:.0f} grey" if f.pixel_difference else "")
            captions += [f"{f.split}: dropped, {apart}\n{Path(f.image).name}"]
            captions += [f"{f.duplicate_split}: kept\n{Path(f.duplicate_of).name}"]
        report.contact_sheet = str(contact_sheet(paths, captions, out / "duplicates.png", columns=2))
    report.seconds = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=1), encoding="utf-8")
    return report
