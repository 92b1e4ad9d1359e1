"""Write a tiny exported model and a few images into FOLDER, for checking a runtime-only
install (no torch) with ``make runtime-check``. Run with the full (training) install.

    python tests/make_runtime_fixture.py FOLDER
"""

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import write_registry  # noqa: E402
from waterdrop.config import load_registry  # noqa: E402
from waterdrop.data.demo import generate  # noqa: E402
from waterdrop.export import export_onnx  # noqa: E402
from waterdrop.model.multitask import MultiTaskNet  # noqa: E402


def main() -> None:
    folder = Path(sys.argv[1]).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    data = generate(folder / "data", seed=0, scale=0.02)
    cfg = load_registry(write_registry(folder / "registry", data))
    torch.manual_seed(0)
    thresholds = {t.name: 0.5 if t.head_type == "BinaryHead" else dict.fromkeys(t.labels, 0.5) for t in cfg.tasks}
    export_onnx(MultiTaskNet(cfg).eval(), cfg, thresholds, folder / "model.onnx")
    images = folder / "images"
    images.mkdir()
    for source in sorted((data / "scene_tags" / "val").glob("*.jpg"))[:3]:
        shutil.copy(source, images / source.name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")


if __name__ == "__main__":
    main()
