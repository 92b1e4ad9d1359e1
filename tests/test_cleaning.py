"""Data cleaning (waterdrop.curation.cleaning, tools/clean_data.py) on small generated photos."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, bad_input_corpus

from waterdrop.curation.cleaning import Flag, border_box, clean, close_pairs, hamming, phash
from waterdrop.imageio import read_image
from waterdrop.records import read_class_folders, read_labeled_manifest


def photo(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """Photo-like RGB: a smooth random colour field with a few filled discs and boxes."""
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(3):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y, size = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(8, 30))
        cv2.circle(image, (x, y), size, colour, -1)
        cv2.rectangle(image, (width - x, height - y), (width - x + size, height - y + size), colour[::-1], -1)
    return image


def save(path: Path, image: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix == ".jpg" else []
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), options)
    return path


def near_copy(image: np.ndarray) -> np.ndarray:
    """Resized to 80 % and re-encoded as JPEG at quality 60: what a re-upload does."""
    small = cv2.resize(image, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    _, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 60])
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)


def digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def flags_by_name(report) -> dict[str, Flag]:
    return {Path(flag.image).name: flag for flag in report.flags}


def test_borders_are_trimmed_into_copies_and_originals_stay(tmp_path):
    contents = {"white.png": photo(1), "black.png": photo(4)}
    white = cv2.copyMakeBorder(contents["white.png"], 10, 12, 7, 30, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    black = cv2.copyMakeBorder(contents["black.png"], 20, 20, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))  # letterbox
    framed = cv2.copyMakeBorder(photo(2), 24, 24, 24, 24, cv2.BORDER_CONSTANT, value=(250, 250, 250))
    save(tmp_path / "data/white.png", white)
    save(tmp_path / "data/black.png", black)
    save(tmp_path / "data/framed.jpg", framed, quality=75)
    save(tmp_path / "data/plain.png", photo(3))
    before = digests(tmp_path / "data")
    report = clean([("train", tmp_path / "data")], tmp_path / "out", unlabelled=True)
    assert digests(tmp_path / "data") == before
    lines = {
        Path(item.get("trimmed_from", item["image"])).name: item
        for item in map(json.loads, open(tmp_path / "out/train.jsonl"))
    }
    assert set(lines) == {"white.png", "black.png", "framed.jpg", "plain.png"}
    for name in ("white.png", "black.png"):  # PNG: the very pixels of the photo come back
        copy = Path(lines[name]["image"])
        assert copy.parent == tmp_path / "out/trimmed/train" and copy.suffix == ".png"
        assert np.array_equal(read_image(copy), contents[name])
    # JPEG rings next to the content; the border goes with up to one 8-pixel block of it.
    framed_copy = read_image(lines["framed.jpg"]["image"])
    assert 128 - 8 <= framed_copy.shape[1] <= 128 and 96 - 8 <= framed_copy.shape[0] <= 96
    assert lines["plain.png"]["image"] == str(tmp_path / "data/plain.png") and "trimmed_from" not in lines["plain.png"]
    assert report.splits["train"] == {"images": 4, "kept": 4, "trimmed": 3}
    assert flags_by_name(report)["white.png"].message == "165 x 118 -> 128 x 96"


def test_border_box_leaves_photos_and_uniform_images_alone():
    for seed in range(20):
        assert border_box(photo(seed), 8) == (0, 96, 0, 128)
    sky = np.linspace(150, 230, 128).astype(np.uint8)[None, :, None].repeat(96, 0).repeat(3, 2)  # a graded sky
    sky[60:] = photo(5)[60:]
    assert border_box(sky, 8) == (0, 96, 0, 128)
    assert border_box(np.full((50, 60, 3), 255, np.uint8), 8) == (0, 0, 0, 0)
    clipped = np.full((96, 128, 3), 255, np.uint8)  # a burnt-out sky over hills: flat, but no straight edge
    hills = 40 + (15 * np.sin(np.arange(128) / 9)).astype(int)
    for x, top in enumerate(hills):
        clipped[top:, x] = photo(6)[top:, x]
    assert border_box(clipped, 8) == (0, 96, 0, 128)


def test_small_and_uniform_images_are_dropped(tmp_path):
    save(tmp_path / "data/a/tiny.png", photo(1, 50, 60))  # 3000 pixels
    save(tmp_path / "data/a/blank.png", np.full((200, 200, 3), 255, np.uint8))
    save(tmp_path / "data/a/framed_tiny.png", cv2.copyMakeBorder(photo(2, 40, 40), 30, 30, 30, 30, cv2.BORDER_CONSTANT))
    save(tmp_path / "data/a/ok.png", photo(3, 60, 60))  # 3600 pixels: kept
    report = clean([("train", tmp_path / "data")], tmp_path / "out")
    flags = flags_by_name(report)
    assert {name: flag.reason for name, flag in flags.items()} == {
        name: "too_small" for name in ("tiny.png", "blank.png", "framed_tiny.png")
    }
    assert flags["framed_tiny.png"].message == "40 x 40 once trimmed" and flags["blank.png"].message.startswith("0 x 0")
    assert [Path(r.path).name for r in read_labeled_manifest(tmp_path / "out/train.jsonl")] == ["ok.png"]


def test_duplicates_within_and_across_splits(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    for seed in range(6):
        save(train / f"{seed}.png", photo(seed))
    (train / "0_copy.png").write_bytes((train / "0.png").read_bytes())  # exact, within train
    save(train / "1_near.jpg", near_copy(photo(1)))  # near, within train
    (train / "1_near_b.jpg").write_bytes((train / "1_near.jpg").read_bytes())  # a copy of a dropped image
    save(test / "2_leak.png", photo(2))  # exact, train -> test
    save(test / "3_leak.jpg", near_copy(photo(3)))  # near, train -> test
    save(test / "9.png", photo(9))
    report = clean([("train", train), ("test", test)], tmp_path / "out", unlabelled=True)
    found = {
        (name, f.reason, Path(f.duplicate_of).name, f.duplicate_split) for name, f in flags_by_name(report).items()
    }
    assert found == {
        ("0_copy.png", "exact_duplicate", "0.png", "train"),  # the first of a split stays
        ("1_near.jpg", "near_duplicate", "1.png", "train"),
        ("1_near_b.jpg", "near_duplicate", "1.png", "train"),  # goes the way of its first copy
        ("2.png", "exact_duplicate", "2_leak.png", "test"),  # a leak leaves train; test stays whole
        ("3.png", "near_duplicate", "3_leak.jpg", "test"),
    }
    assert [f.distance for f in report.flags if f.reason == "exact_duplicate"] == [0, 0]
    assert report.splits["train"] == {
        "images": 9,
        "kept": 4,
        "exact_duplicate": 2,
        "near_duplicate": 3,
        "cross_split": 2,
    }
    assert report.splits["test"] == {"images": 3, "kept": 3}
    kept = [Path(line["image"]).name for line in map(json.loads, open(tmp_path / "out/train.jsonl"))]
    assert kept == ["0.png", "1.png", "4.png", "5.png"]
    sheet = cv2.imread(report.contact_sheet)
    assert sheet.shape[1] == 2 * 160 and sheet.shape[0] > 5 * 160  # five rows of two tiles
    saved = json.loads((tmp_path / "out/report.json").read_text())
    assert saved["splits"] == report.splits and len(saved["flags"]) == 5 and saved["settings"]["near_distance"] == 8


def test_distinct_photos_are_not_duplicates(tmp_path):
    images = [photo(seed) for seed in range(40)]
    hashes = np.array([phash(image) for image in images], dtype=np.uint64)
    closest = min(int(hamming(hashes[i], np.delete(hashes, i)).min()) for i in range(len(hashes)))
    assert closest > 8, closest
    for seed, image in enumerate(images):
        save(tmp_path / "data" / f"{seed:02d}.jpg", image)
    report = clean([("all", tmp_path / "data")], tmp_path / "out", unlabelled=True)
    assert report.flags == [] and report.splits["all"] == {"images": 40, "kept": 40}
    assert report.contact_sheet is None


def test_hamming_with_and_without_numpy_bitwise_count(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2**63, 50, dtype=np.uint64), rng.integers(0, 2**63, 50, dtype=np.uint64)
    truth = [bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b)]
    assert hamming(a, b).tolist() == truth
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy 1.26, which the runtime install allows
    assert hamming(a, b).tolist() == truth


def test_close_pairs_are_every_pair_within_the_distance():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = [sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 11), replace=False)) for _ in base]
    hashes = np.concatenate([base, base ^ np.array(flips, dtype=np.uint64), base[:5]])  # and 5 equal ones
    distances = np.stack([hamming(h, hashes) for h in hashes])
    truth = {(i, j): int(distances[i, j]) for i, j in zip(*np.nonzero(distances <= 8)) if i > j}
    for chunk in (7, 1 << 16):  # queries in chunks or all at once
        pairs, found = close_pairs(hashes, 8, chunk=chunk)
        assert dict(zip(map(tuple, pairs.tolist()), found.tolist())) == truth
    assert len(truth) > 250  # not a vacuous check


def test_bad_files_and_lines_are_counted_and_extra_keys_carried(tmp_path):
    good, bad = bad_input_corpus(tmp_path / "odd")
    save(tmp_path / "photo.jpg", photo(1))
    extra = {"image": "photo.jpg", "labels": ["cat"], "missing": ["dog"], "boxes": [], "source": "crawl-7", "id": 3}
    lines = [json.dumps(extra), "not json", json.dumps({"labels": []})]
    lines += [json.dumps({"image": str(p.relative_to(tmp_path)), "labels": []}) for p in good + bad]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    report = clean([("train", tmp_path / "train.jsonl")], tmp_path / "out", min_pixels=0, border_tolerance=None)
    reasons = {flag.image: flag.reason for flag in report.flags if flag.reason != "exact_duplicate"}
    assert reasons == {
        **{str(p): "undecodable" for p in bad},
        **{f"{tmp_path / 'train.jsonl'}:{n}": "bad_line" for n in (2, 3)},
    }
    out = [json.loads(line) for line in open(tmp_path / "out/train.jsonl")]
    assert out[0] == {**extra, "image": str(tmp_path / "photo.jpg")}
    records = read_labeled_manifest(tmp_path / "out/train.jsonl")  # the trainer's own reader resolves the paths
    duplicates = {flag.image for flag in report.flags if flag.reason == "exact_duplicate"}  # rgba.png = deep16.png
    kept = [tmp_path / "photo.jpg", *(p for p in good if str(p) not in duplicates)]
    assert [r.path for r in records] == kept and records[0].missing == ["dog"] and len(duplicates) == 1


def test_folder_labels_follow_the_class_folders(tmp_path):
    save(tmp_path / "data/cat/a.jpg", photo(1))
    save(tmp_path / "data/dog/deep/b.jpg", photo(2))
    clean([("train", tmp_path / "data")], tmp_path / "out")
    records = read_labeled_manifest(tmp_path / "out/train.jsonl")
    expected = read_class_folders(tmp_path / "data", ["cat", "dog"])
    assert [(r.path, r.labels) for r in records] == [(r.path, r.labels) for r in expected]


def test_split_names_must_be_distinct_plain_names(tmp_path):
    save(tmp_path / "a/train/x.png", photo(1))
    save(tmp_path / "b/train/x.png", photo(1))
    with pytest.raises(ValueError, match="NAME=PATH"):
        clean([("train", tmp_path / "a/train"), ("train", tmp_path / "b/train")], tmp_path / "out")
    with pytest.raises(ValueError, match="folder of images or a .jsonl"):
        clean([("train", tmp_path / "a/train/x.png")], tmp_path / "out")
    with pytest.raises(ValueError, match="0-63"):
        clean([("train", tmp_path / "a/train")], tmp_path / "out", near_distance=-1)


def test_cli(tmp_path):
    save(tmp_path / "task/train/pos/a.png", photo(1))
    save(tmp_path / "task/train/pos/b.png", photo(2))
    save(tmp_path / "task/val/pos/c.png", photo(2))
    (tmp_path / "task/train/pos/broken.jpg").write_bytes(b"\xff\xd8\xff")
    tool = str(REPO / "tools/clean_data.py")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, tool, str(tmp_path / "task/train"), f"held_out={tmp_path / 'task/val'}", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # done, with one undecodable image (counted)
    assert sorted(p.name for p in out.iterdir()) == ["duplicates.png", "held_out.jsonl", "report.json", "train.jsonl"]
    assert [len(read_labeled_manifest(out / f"{name}.jsonl")) for name in ("train", "held_out")] == [1, 1]
    header, train_row = done.stdout.splitlines()[:2]
    assert header.split() == ["split", "images", "kept", "undecodable", "exact_duplicate", "cross_split"]
    assert train_row.split() == ["train", "3", "1", "1", "1", "1"]
    refused = subprocess.run(
        [sys.executable, tool, str(tmp_path / "nowhere"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "no such source: " in refused.stderr
    refused = subprocess.run([sys.executable, tool, str(tmp_path / "task/train"), "--out", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "exists already; pass --overwrite" in refused.stderr


def test_a_folder_whose_labels_cannot_be_read_is_refused_never_written_as_negatives(tmp_path):
    # The demo's layout: images directly in train/, labels in train.jsonl beside it.
    save(tmp_path / "task/train/0.png", photo(1))
    save(tmp_path / "task/train/1.png", photo(2))
    (tmp_path / "task/train.jsonl").write_text('{"image": "train/0.png", "labels": ["pos"]}\n'
                                                '{"image": "train/1.png", "labels": []}\n')
    tool = str(REPO / "tools/clean_data.py")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, tool, str(tmp_path / "task/train"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "labels cannot be read from the layout" in done.stderr
    assert str(tmp_path / "task/train.jsonl") in done.stderr and not out.exists()
    # Said to be unlabelled: the rows carry no labels at all (never [], a negative).
    done = subprocess.run([sys.executable, tool, str(tmp_path / "task/train"), "--out", str(out), "--unlabelled"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("labels" not in row for row in rows) and "unlabelled" in done.stdout
    # The manifest keeps its labels; a folder mixing label folders and loose images is refused.
    done = subprocess.run([sys.executable, tool, str(tmp_path / "task/train.jsonl"), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["labels"] for line in (tmp_path / "m/train.jsonl").read_text().splitlines()] == [
        ["pos"], []]
    save(tmp_path / "mixed/pos/a.png", photo(3))
    save(tmp_path / "mixed/b.png", photo(4))
    with pytest.raises(ValueError, match="1 of its images lie directly in it"):
        clean([("mixed", tmp_path / "mixed")], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
