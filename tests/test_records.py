"""Task records (waterdrop.records): folders per class and manifests, read the same by every tool."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import REPO
from waterdrop.imageio import read_image
from waterdrop.records import (
    DataError,
    parse_manifest,
    read_class_folders,
    read_labeled_manifest,
    read_lines,
    read_records,
    read_unlabeled,
)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8, 3), 90, np.uint8))
    return path


def _folders(root: Path) -> Path:
    _image(root / "cat" / "a.png")
    _image(root / "dog" / "deep" / "b.png")
    _image(root / ".cache" / "c.png")  # hidden: not a class
    (root / "notes.txt").write_text("not an image\n")
    return root


def _manifest(path: Path) -> Path:
    _image(path.parent / "img" / "1.png")
    lines = [{"image": "img/1.png", "labels": ["cat"]}, {"image": "img/2.png", "labels": [], "missing": ["dog"]}]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    return path


# The torch-free install has no training stack at all; None in sys.modules makes its import fail.
READ_WITHOUT_TORCH = """
import json, sys
for name in ("torch", "torchvision", "timm", "mmengine"):
    sys.modules[name] = None
from pathlib import Path
from waterdrop.records import read_records, read_unlabeled
folders, manifest = Path(sys.argv[1]), Path(sys.argv[2])
found = {
    "folders": [[str(r.path.relative_to(folders)), r.labels] for r in read_records(folders, ["cat", "dog"])],
    "manifest": [[r.path.name, r.labels, r.missing, r.line] for r in read_records(manifest, ["cat", "dog"])],
    "unlabeled": len(read_unlabeled(folders)),
}
print(json.dumps(found))
"""


def test_the_reader_imports_and_reads_without_torch(tmp_path):
    folders, manifest = _folders(tmp_path / "folders"), _manifest(tmp_path / "split" / "train.jsonl")
    done = subprocess.run([sys.executable, "-c", READ_WITHOUT_TORCH, str(folders), str(manifest)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "folders": [["cat/a.png", ["cat"]], ["dog/deep/b.png", ["dog"]]],
        "manifest": [["1.png", ["cat"], [], 1], ["2.png", [], ["dog"], 3]],
        "unlabeled": 2,
    }


def test_manifest_lines_are_joined_to_its_folder_and_bad_ones_named(tmp_path):
    manifest = tmp_path / "pool.jsonl"
    manifest.write_text('{"image": "a.jpg", "labels": [], "source": 7}\n\n{not json\n[1, 2]\n{"image": ""}\n'
                        '{"image": "/abs/b.jpg"}\n')
    lines = list(parse_manifest(manifest))
    assert [line.number for line in lines] == [1, 3, 4, 5, 6]
    assert lines[0].item == {"image": str(tmp_path / "a.jpg"), "labels": [], "source": 7}  # other keys pass
    assert lines[4].item == {"image": "/abs/b.jpg"}
    assert lines[1].problem.startswith("not JSON: Expecting property name") and lines[1].item is None
    assert lines[2].problem == lines[3].problem == "expected a JSON object with an 'image' path"
    with pytest.raises(DataError, match=re.escape(f"{manifest}:3: not JSON")):
        read_labeled_manifest(manifest)
    with pytest.raises(DataError, match=re.escape(f"{manifest}:3: not JSON")):
        read_unlabeled(manifest)
    manifest.write_text('{"image": "a.jpg", "labels": ["cat"]}\n{"image": "b.jpg"}\n')
    with pytest.raises(DataError, match=re.escape(f"{manifest}:2: missing key 'labels'")):
        read_labeled_manifest(manifest)
    assert [r.path.name for r in read_unlabeled(manifest)] == ["a.jpg", "b.jpg"]  # labels are not needed there
    manifest.write_text("\n")
    with pytest.raises(DataError, match="pool.jsonl: no images listed"):
        read_labeled_manifest(manifest)


def test_a_path_that_is_not_utf8_still_names_its_file(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name, as old archives have
    _image(tmp_path / "x.png").rename(tmp_path / name)
    manifest = tmp_path / "train.jsonl"
    manifest.write_bytes(b'{"image": "caf\xe9.png", "labels": []}\n')
    record, = read_labeled_manifest(manifest)
    assert record.path == tmp_path / name and read_image(record.path).shape == (8, 8, 3)


def test_class_folders_refuse_unknown_names_and_loose_images(tmp_path):
    root = _folders(tmp_path / "train")
    assert [r.labels for r in read_class_folders(root)] == [["cat"], ["dog"]]
    with pytest.raises(DataError, match="folder name 'dog' is not a label; known: cat, bird"):
        read_class_folders(root, ["cat", "bird"])
    _image(root / "loose.png")
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"1 of its images lie directly in it.*\(such as .*train.jsonl\)"):
        read_records(root, ["cat", "dog"])
    with pytest.raises(DataError, match=r"lie directly in it.*or pass --unlabelled"):
        list(read_lines(root))
    assert len(list(read_lines(root, unlabelled=True))) == 3  # loose and class images alike, hidden ones not
    with pytest.raises(DataError, match="expected a .jsonl manifest or a folder"):
        read_records(tmp_path / "nowhere", ["cat"])
    with pytest.raises(DataError, match="train: all of its images lie directly in it"):
        read_records(_image(tmp_path / "flat" / "train" / "0.png").parent, ["cat"])
