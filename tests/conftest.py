"""Shared fixtures: a tiny generated demo dataset and a registry with a tiny backbone."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from waterdrop.data.demo import generate

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def write_registry(folder: Path, data_root: Path, **model_overrides) -> Path:
    """A registry with the repository's task files, pointed at ``data_root``, on test_resnet at 64 px."""
    registry = yaml.safe_load((REPO / "registry.yaml").read_text())
    registry["demo_data"] = None
    registry["model"].update({"backbone": "test_resnet", "pretrained": None, "input_size": 64, **model_overrides})
    registry["train"].update({"epochs": 1, "batch_size": 16, "num_workers": 0, "log_interval": 5})
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    for extra in (REPO / "tasks").glob("*_relations.yaml"):
        shutil.copy(extra, folder / "tasks" / extra.name)
    for task_file in registry["tasks"]:
        task = yaml.safe_load((REPO / task_file).read_text())
        task_name = task["name"]
        task["data"] = {"train": str(data_root / task_name / "train.jsonl"),
                        "val": str(data_root / task_name / "val.jsonl")}
        (folder / task_file).write_text(yaml.safe_dump(task))
    path = folder / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    return path


def edit_task(registry_file: Path, name: str, **changes) -> None:
    """Change top-level keys of a task YAML written by ``write_registry``; mappings are updated."""
    path = registry_file.parent / "tasks" / f"{name}.yaml"
    task = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(task.get(key), dict):
            task[key].update(value)
        else:
            task[key] = value
    path.write_text(yaml.safe_dump(task))


def add_task(registry_file: Path, task: dict) -> None:
    """Write one more task YAML beside those of ``write_registry`` and list it in the registry."""
    (registry_file.parent / "tasks" / f"{task['name']}.yaml").write_text(yaml.safe_dump(task))
    registry = yaml.safe_load(registry_file.read_text())
    registry["tasks"].append(f"tasks/{task['name']}.yaml")
    registry_file.write_text(yaml.safe_dump(registry))


def edit_train(registry_file: Path, **changes) -> None:
    """Set keys of the ``train`` section of a registry written by ``write_registry``."""
    registry = yaml.safe_load(registry_file.read_text())
    registry["train"].update(changes)
    registry_file.write_text(yaml.safe_dump(registry))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("demo"), seed=0, scale=0.04)


@pytest.fixture
def registry_file(tmp_path, demo_root) -> Path:
    return write_registry(tmp_path, demo_root)


@pytest.fixture
def copy_demo(tmp_path, demo_root):
    """A private copy of the demo data that a test may damage."""
    def make() -> Path:
        target = tmp_path / "demo_copy"
        shutil.copytree(demo_root, target)
        return target
    return make


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_png(path: Path, side: int = 30000) -> Path:
    """A real, complete side x side 1-bit grayscale PNG (a few hundred KB on disk; several GB
    once decoded to RGB)."""
    packer, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels)
                     + png_chunk(b"IEND", b""))
    return path


def bad_input_corpus(folder: Path) -> tuple[list[Path], list[Path]]:
    """Odd files users' data holds: (decodable ones, ones that must be skipped and named)."""
    import cv2
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", rgb)
    full = encoded.tobytes()
    good = {"cmyk.jpg": None, "deep16.png": rgb.astype(np.uint16) * 257, "rgba.png": np.dstack([rgb, rgb[..., :1]]),
            "gray.png": rgb[..., 0]}
    for name, pixels in good.items():
        if pixels is None:
            Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / name, quality=95)
        else:
            cv2.imwrite(str(folder / name), pixels)
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8)))
    (folder / "text.jpg").write_text("this is a text file with a .jpg suffix\n")
    (folder / "unreadable.jpg").mkdir()  # a folder named like an image: it cannot be read as a file
    (folder / "dangling.jpg").symlink_to(folder / "no_such_target.jpg")
    huge_png(folder / "huge.png")
    bad = ["truncated.jpg", "zero.jpg", "corrupt.jpg", "text.jpg", "unreadable.jpg", "dangling.jpg", "huge.png"]
    return [folder / n for n in good], [folder / n for n in bad]
