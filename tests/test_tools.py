"""What the tools share: output places, the no-overwrite rule, progress lines, --help defaults."""

import io
import subprocess
import sys

import pytest

from tests.conftest import REPO
from waterdrop import cli, progress
from waterdrop.progress import Progress

TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))


def test_default_folders_are_numbered_and_given_ones_are_never_overwritten(tmp_path):
    run = tmp_path / "run"
    assert cli.output_path(None, run / "eval") == run / "eval"  # nothing there yet
    (run / "eval").mkdir(parents=True)
    assert cli.output_path(None, run / "eval") == run / "eval"  # an empty folder is free
    (run / "eval" / "metrics.json").write_text("{}")
    (run / "eval-2").mkdir()
    (run / "eval-2" / "x").write_text("")
    assert cli.output_path(None, run / "eval") == run / "eval-3"
    with pytest.raises(cli.UsageError, match="the folder exists already; pass --overwrite"):
        cli.output_path(run / "eval", run / "unused")
    assert cli.output_path(run / "eval", run / "unused", overwrite=True) == run / "eval"
    (run / "model.onnx").write_bytes(b"x")
    with pytest.raises(cli.UsageError, match="the file exists already; .*choose another -o"):
        cli.output_path(None, run / "model.onnx", folder=False)
    assert cli.run_folder(run / "model.onnx") == run and cli.run_folder(run) == run


def test_files_of_the_wrong_kind_are_named(tmp_path):
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    renamed = tmp_path / "photo.onnx"
    renamed.write_bytes(jpeg.read_bytes())
    for path, message in ((jpeg, "not an ONNX model file \\(a JPEG image\\)"), (renamed, "a JPEG image"),
                          (tmp_path, "is a folder"), (tmp_path / "nope.onnx", "no such model file")):
        with pytest.raises(cli.UsageError, match=message):
            cli.check_onnx_file(path)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(cli.UsageError, match="is an exported ONNX model; this tool needs the run folder"):
        cli.check_run(tmp_path / "model.onnx")
    with pytest.raises(cli.UsageError, match="is a JPEG image; give a run folder"):
        cli.check_run(jpeg)
    with pytest.raises(cli.UsageError, match="not a registry YAML file"):
        cli.check_registry(jpeg)
    (tmp_path / "registry.yaml").write_text("tasks: []\n")
    with pytest.raises(cli.UsageError, match="is a .yaml file; give a run folder or a .pth checkpoint"):
        cli.check_run(tmp_path / "registry.yaml")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    cli.check_exists([tmp_path / "link.jpg"])  # a broken link is an input that fails later, counted
    with pytest.raises(cli.UsageError, match="no such input: .*gone.jpg"):
        cli.check_exists([jpeg, tmp_path / "gone.jpg"])


def test_progress_line_gives_done_total_rate_and_time_left():
    stream = io.StringIO()
    meter = Progress("evaluate val", total=200, stream=stream, quiet=False)
    meter.started -= 10  # ten seconds ago
    meter.update(50, failed=2)
    line = meter.line()
    assert line.startswith("evaluate val  50/200 images (25%)  5.0 images/s  elapsed 00:10  left ~00:30")
    assert line.endswith("2 failed")
    meter.close()
    assert stream.getvalue().splitlines()[-1].startswith("evaluate val  50/200 images")
    slow = Progress("recording", total=4, unit="epochs", stream=io.StringIO(), quiet=False)
    slow.started -= 30
    slow.update(1)
    assert "30.0 s per epoch" in slow.line() and "left ~01:30" in slow.line()
    silent = io.StringIO()
    progress.set_quiet(True)
    try:
        with Progress("quiet", total=3, stream=silent) as meter:
            meter.update(3)
    finally:
        progress.set_quiet(False)
    assert silent.getvalue() == "" and meter.done == 3


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_quiet_and_shows_its_defaults(tool):
    done = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "--quiet" in done.stdout and "Exit codes" in done.stdout
    assert "(default: False)" not in done.stdout and "(default: None)" not in done.stdout
    if tool == "clean_data.py":
        assert "(default: 3600)" in done.stdout and "(default: 8)" in done.stdout
