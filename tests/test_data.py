"""Decoding bad files, counted skips, manifests with bad labels, the multi-task sampler."""

import json
import struct
import zlib

import cv2
import numpy as np
import pytest

from tests.conftest import huge_png, png_chunk, write_registry
from waterdrop.config import load_registry
from waterdrop.data.dataset import collate
from waterdrop.data.loaders import build_datasets
from waterdrop.data.sampler import MultiTaskBatchSampler, task_sampling_probabilities
from waterdrop.imageio import ImageDecodeError, read_image
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.records import DataError


def _jpeg(path, image):
    ok, data = cv2.imencode(".jpg", image)
    path.write_bytes(data.tobytes())
    return data.tobytes()


def _png_header_only(path, width, height):
    """A PNG claiming width x height whose pixel data is cut off."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                     + png_chunk(b"IDAT", zlib.compress(b"\0" * 100)))


def test_decoder_handles_every_kind_of_odd_file(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    full = _jpeg(tmp_path / "ok.jpg", rgb)
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image at all" * 10)
    _png_header_only(tmp_path / "enormous.png", 20000, 20000)
    huge_png(tmp_path / "huge.png")
    cv2.imwrite(str(tmp_path / "gray.png"), rgb[:, :, 0])
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([rgb, np.full((40, 50), 128, np.uint8)]))
    cv2.imwrite(str(tmp_path / "deep.png"), rgb.astype(np.uint16) * 257)
    for name in ("truncated.jpg", "empty.jpg", "corrupt.jpg", "enormous.png", "huge.png", "absent.jpg"):
        with pytest.raises(ImageDecodeError, match=name):
            read_image(tmp_path / name)
    for name in ("ok.jpg", "gray.png", "rgba.png", "deep.png"):
        image = read_image(tmp_path / name)
        assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    assert np.array_equal(read_image(tmp_path / "deep.png"), rgb[:, :, ::-1])
    with pytest.raises(ImageDecodeError, match="30000 x 30000 pixels is over the limit"):
        read_image(tmp_path / "huge.png")
    # A TIFF's directory may come after the pixel data, far from the start of the file.
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, 30000) for tag in (256, 257))
    (tmp_path / "huge.tif").write_bytes(b"II*\x00" + struct.pack("<I", 8 + 300_000) + bytes(300_000)
                                        + struct.pack("<H", 2) + entries + struct.pack("<I", 0))
    with pytest.raises(ImageDecodeError, match="huge.tif: 30000 x 30000 pixels is over the limit"):
        read_image(tmp_path / "huge.tif")
    (tmp_path / "odd.xyz").write_bytes(b"\x00\x01 something no reader knows" * 20)
    with pytest.raises(ImageDecodeError, match="not an image waterdrop reads"):
        read_image(tmp_path / "odd.xyz")


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    pil_image = pytest.importorskip("PIL.Image")
    pil_image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red
    image = read_image(tmp_path / "cmyk.jpg")
    assert image.shape == (24, 24, 3)
    red, green, blue = image.reshape(-1, 3).mean(0)
    assert red > 200 and green < 60 and blue < 60


def test_undecodable_images_are_skipped_counted_and_named(tmp_path, copy_demo):
    root = copy_demo()
    manifest = root / "disgusting" / "train.jsonl"
    first, second = (json.loads(line)["image"] for line in manifest.read_text().splitlines()[:2])
    (manifest.parent / first).write_bytes(b"")
    huge_png(manifest.parent / second)
    cfg = load_registry(write_registry(tmp_path, root))
    dataset = build_datasets(cfg, MultiTaskNet(cfg), "train")
    sample = dataset[0]
    assert sample["skipped"] == [str(manifest.parent / first), str(manifest.parent / second)]
    assert sample["image"].shape == (3, 64, 64)
    batch = collate([sample, dataset[2]], cfg.task_names)
    assert batch["skipped"] == [["disgusting", str(manifest.parent / first)],
                                ["disgusting", str(manifest.parent / second)]]
    assert batch["inputs"].shape == (2, 3, 64, 64)


def test_unknown_label_in_manifest_names_file_and_line(tmp_path, copy_demo):
    root = copy_demo()
    manifest = root / "scene_tags" / "val.jsonl"
    lines = manifest.read_text().splitlines()
    lines[2] = json.dumps({"image": "val/00002.jpg", "labels": ["sky", "unicorn"]})
    manifest.write_text("\n".join(lines) + "\n")
    cfg = load_registry(write_registry(tmp_path, root))
    with pytest.raises(DataError, match=r"val.jsonl: line 3: unknown label 'unicorn'"):
        build_datasets(cfg, MultiTaskNet(cfg), "val")
    lines[2] = "{broken json"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"val.jsonl:3:"):
        build_datasets(cfg, MultiTaskNet(cfg), "val")


def test_empty_label_list_is_a_normal_image_in_a_binary_task(tmp_path, demo_root):
    registry = write_registry(tmp_path, demo_root)
    image = sorted((demo_root / "disgusting" / "train").glob("*.jpg"))[0]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"image": str(image), "labels": []}) + "\n"
                        + json.dumps({"image": str(image), "labels": ["insects"]}) + "\n")
    task_file = registry.parent / "tasks" / "disgusting.yaml"
    task_file.write_text(task_file.read_text().replace(str(demo_root / "disgusting" / "train.jsonl"), str(manifest)))
    cfg = load_registry(registry)
    dataset = build_datasets(cfg, MultiTaskNet(cfg), "train").datasets[0]
    assert [int(t) for t in dataset.targets] == [0, 1]
    manifest.write_text(json.dumps({"image": str(image), "labels": ["insects", "reptiles"]}) + "\n")
    with pytest.raises(DataError, match="train.jsonl: line 1: expected one label"):
        build_datasets(cfg, MultiTaskNet(cfg), "train")


def test_folder_per_class_data(tmp_path, demo_root):
    folders = tmp_path / "folders"
    for label in ("normal", "insects"):
        (folders / label).mkdir(parents=True)
        for i in range(3):
            _jpeg(folders / label / f"{i}.jpg", np.full((20, 20, 3), 40 * i, np.uint8))
    registry = write_registry(tmp_path, demo_root)
    task_file = registry.parent / "tasks" / "disgusting.yaml"
    task_file.write_text(task_file.read_text().replace(str(demo_root / "disgusting" / "train.jsonl"), str(folders)))
    # Hidden folders (notebook checkpoints, caches) are not classes and not images.
    for hidden in (folders / ".ipynb_checkpoints", folders / "insects" / ".cache"):
        hidden.mkdir()
        _jpeg(hidden / "copy.jpg", np.zeros((20, 20, 3), np.uint8))
    cfg = load_registry(registry)
    dataset = build_datasets(cfg, MultiTaskNet(cfg), "train").datasets[0]
    assert sorted(int(t) for t in dataset.targets) == [0, 0, 0, 1, 1, 1]
    (folders / "spiders").mkdir()
    with pytest.raises(DataError, match="folder name 'spiders' is not a label"):
        build_datasets(cfg, MultiTaskNet(cfg), "train")


def test_sampler_mixes_tasks_by_policy_and_shards_under_ddp():
    sizes = [300, 100]
    weights = task_sampling_probabilities("size", sizes, ["a", "b"], {})
    assert weights.tolist() == [0.75, 0.25]
    assert task_sampling_probabilities("weights", sizes, ["a", "b"], {"b": 2.0}).tolist() == [0.0, 1.0]
    sampler = MultiTaskBatchSampler(sizes, 20, weights, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    flat = np.concatenate(batches)
    assert 0.65 < (flat < 300).mean() < 0.85
    assert batches == list(MultiTaskBatchSampler(sizes, 20, weights, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(MultiTaskBatchSampler(sizes, 20, weights, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 10 and ranks[0] != ranks[1]
    # every image of the small task is seen before any repeats
    b_only = MultiTaskBatchSampler([5, 100], 10, np.array([1.0, 0.0]), seed=0)
    first_pass = next(iter(b_only))[:5]
    assert sorted(first_pass) == [0, 1, 2, 3, 4]


def test_a_jpeg_decodes_at_the_smallest_dct_scale_that_keeps_the_size_needed(tmp_path):
    from waterdrop.imageio import read_image, read_with_size, reduction

    pixels = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "big.jpg"), pixels)
    cv2.imwrite(str(tmp_path / "big.png"), pixels)
    assert reduction((1600, 1200), 192)[0] == 4 and reduction((1600, 1200), 151)[0] == 4
    assert reduction((1600, 1200), 149)[0] == 8 and reduction((1600, 1200), 700)[0] == 1
    image, size = read_with_size(tmp_path / "big.jpg", 192)
    assert image.shape == (300, 400, 3) and size == (1600, 1200)  # the file's own size, for boxes and rows
    assert read_image(tmp_path / "big.png", 192).shape == (1200, 1600, 3)  # other formats decode whole
    assert read_image(tmp_path / "big.jpg").shape == (1200, 1600, 3)
    # What libjpeg's scaled decode gives is close to decoding whole and shrinking.
    whole = cv2.resize(read_image(tmp_path / "big.jpg"), (400, 300), interpolation=cv2.INTER_AREA)
    assert np.abs(whole.astype(int) - image.astype(int)).mean() < 8


def test_a_rotated_jpeg_reports_the_size_it_is_shown_at(tmp_path):
    """OpenCV turns an image by its EXIF orientation; boxes and sizes follow the turned image,
    whole or reduced."""
    from PIL import Image

    from waterdrop.imageio import read_with_size

    pixels = np.random.default_rng(1).integers(0, 256, (1201, 1603, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[274] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=90)
    for min_side in (None, 192):
        image, size = read_with_size(tmp_path / "turned.jpg", min_side)
        assert size == (1201, 1603)
        assert image.shape[0] > image.shape[1]  # shown upright: taller than wide


def test_a_side_that_shrinks_is_averaged_and_one_that_grows_is_interpolated():
    """1-px stripes shrunk 1.9x: area averaging turns them into their mean grey, where linear
    sampling, near 2x, all but skips every other column and shows stripes that are not there."""
    from waterdrop.imageio import resize

    def stripes(height, width):
        image = np.zeros((height, width, 3), np.uint8)
        image[:, ::2] = 255
        return image

    def ramp(height, width):  # grows down the rows
        column = np.linspace(0, 255, height).astype(np.uint8)
        return np.repeat(np.repeat(column[:, None, None], width, axis=1), 3, axis=2)

    shrunk = resize(stripes(365, 365), 192).astype(float)
    assert abs(shrunk.mean() - 127.5) < 2 and shrunk.std() < 10
    assert cv2.resize(stripes(365, 365), (192, 192), interpolation=cv2.INTER_LINEAR).std() > 60
    # Wide and short: the width is averaged even though the height grows.
    assert resize(stripes(150, 365), 192).astype(float).std() < 10
    # A side that grows is interpolated, never repeated: a ramp keeps rising row by row.
    for image in (ramp(96, 96), ramp(150, 365)):
        rows = resize(image, 192)[:, 0, 0].astype(int)
        assert rows.shape == (192,) and rows[0] <= 2 and rows[-1] >= 253
        assert (np.diff(rows) == 0).mean() < 0.1
    assert np.array_equal(resize(ramp(192, 192), 192), ramp(192, 192))
