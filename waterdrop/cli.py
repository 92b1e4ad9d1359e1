"""What the tools in ``tools/`` share: exit codes, output places, switches, file checks.

Exit codes, the same for every tool:

* 0: everything asked for was done;
* 1: done, but some inputs failed (counted and named) or a gate refused to write;
* 2: a usage or config error; nothing was written.

Where outputs go by default: a tool given a run (a run folder, a checkpoint in one, or the
``model.onnx`` inside one) writes into that run folder under its own subfolder
(``eval/``, ``explain/``, ``selection/<task>/``, ``noisy/<task>/``, ``scans/<source>/``); a tool
given only data writes under ``work_dirs/<tool>/<name>/``. A default folder that already has
files gets a numbered sibling (``eval-2``, ``eval-3``, ...); a folder or file named with
``--out``/``-o`` that already exists is refused unless ``--overwrite``. A scan's folder is
the exception: running the same scan again resumes it. Training writes a checkpoint once;
thresholds chosen later live beside it (``eval/thresholds.json``).

Torch-free: the runtime-only tools (``predict.py``, ``scan.py``, ``quantize.py``) use it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from waterdrop import progress

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
IMAGE_SIGNATURES = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
                    b"BM": "a BMP image", b"RIFF": "a RIFF (WebP) file", b"PK\x03\x04": "a zip archive (a .pth "
                    "checkpoint?)"}


class UsageError(ValueError):
    """A wrong argument: the tool prints the message and exits 2 before writing anything."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default in --help (where it has
    one that says something: not a switch's False, not an unset None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS  # 0 and 0.0 are shown
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the tool's docstring, defaults in --help and ``--quiet``."""
    made = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    made.add_argument("--quiet", action="store_true", help="no progress lines (results and errors still print)")
    return made


def add_overwrite(made: argparse.ArgumentParser) -> None:
    made.add_argument("--overwrite", action="store_true",
                      help="replace an output that already exists (refused otherwise)")


def start(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the shared switches of parsed arguments; returns them."""
    progress.set_quiet(getattr(args, "quiet", False) or progress.is_quiet())
    return args


def _is_used(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def fresh_folder(default: str | Path) -> Path:
    """``default`` when it does not exist or is empty, else the first free ``default-2``, ``-3``..."""
    default = Path(default)
    candidate, number = default, 1
    while _is_used(candidate):
        number += 1
        candidate = default.with_name(f"{default.name}-{number}")
    return candidate


def output_path(given: str | Path | None, default: str | Path, overwrite: bool = False, folder: bool = True) -> Path:
    """Where a tool writes: ``given`` (refused when it exists, unless ``overwrite``), else a
    fresh folder at ``default`` (a default file is refused like a given one)."""
    if given is None and folder:
        return fresh_folder(default)
    path = Path(given if given is not None else default)
    if _is_used(path) and not overwrite:
        what = "folder" if path.is_dir() else "file"
        raise UsageError(f"{path}: the {what} exists already; pass --overwrite to replace it, or choose another "
                         f"{'--out' if folder else '-o'}")
    return path


def run_folder(path: str | Path) -> Path:
    """The run folder of a run folder, a checkpoint file or an exported model inside one."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _signature(path: Path) -> str | None:
    with open(path, "rb") as handle:
        head = handle.read(8)
    return next((what for magic, what in IMAGE_SIGNATURES.items() if head.startswith(magic)), None)


def check_exists(paths: list[str | Path], what: str = "input") -> None:
    """Every path exists; else a UsageError naming those that do not."""
    missing = [str(p) for p in paths if not os.path.lexists(p)]  # a broken link is an input that fails
    if missing:
        raise UsageError(f"no such {what}: {', '.join(missing)}")


def check_onnx_file(path: str | Path) -> Path:
    """``path`` is a file that can be an ONNX model: exists, is a file, is not an image or a checkpoint."""
    path = Path(path)
    check_exists([path], "model file")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the .onnx file written by tools/export.py "
                         f"(e.g. {path / 'model.onnx'})")
    found = _signature(path)
    if found or path.suffix.lower() in (".pth", ".pt", ".jpg", ".jpeg", ".png", ".yaml", ".yml", ".jsonl"):
        raise UsageError(f"{path}: not an ONNX model file ({found or 'a ' + path.suffix + ' file'}); give the .onnx "
                         "file written by tools/export.py")
    return path


def check_run(path: str | Path) -> Path:
    """``path`` is a run folder or a checkpoint file, not an exported model or an image."""
    path = Path(path)
    check_exists([path], "run folder or checkpoint")
    if path.is_file() and path.suffix.lower() == ".onnx":
        raise UsageError(f"{path} is an exported ONNX model; this tool needs the run folder or .pth checkpoint it "
                         f"was exported from (e.g. {path.parent})")
    if path.is_file() and path.suffix.lower() not in (".pth", ".pt"):
        found = _signature(path) or f"a {path.suffix or 'suffix-less'} file"
        raise UsageError(f"{path} is {found}; give a run folder or a .pth checkpoint")
    return path


def check_registry(path: str | Path) -> Path:
    """``path`` is a YAML file (the registry)."""
    path = Path(path)
    check_exists([path], "registry file")
    if path.is_dir() or path.suffix.lower() not in (".yaml", ".yml"):
        raise UsageError(f"{path}: not a registry YAML file (expected a .yaml file such as registry.yaml)")
    return path
