"""glibc malloc settings applied on import (waterdrop.allocator): on by default, off on request,
and the same numbers either way."""

import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

TINY_RUN = """
import hashlib, sys
import torch
from waterdrop import allocator
from waterdrop.engine.checkpoint import best_checkpoint, load_checkpoint
from waterdrop.engine.train import build_runner
from waterdrop.config import load_registry
torch.set_num_threads(1)
runner = build_runner(load_registry(sys.argv[1]), sys.argv[2], printer=lambda *a, **k: None)
runner.train()
state = load_checkpoint(best_checkpoint(sys.argv[2]))["state_dict"]
digest = hashlib.sha256(b"".join(state[k].cpu().numpy().tobytes() for k in sorted(state))).hexdigest()
print(allocator.state(), digest)
"""


def _python(code: str, *args, setting: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("WATERDROP_MALLOC", "GLIBC_TUNABLES")}
    if setting:
        env["WATERDROP_MALLOC"] = setting
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_importing_waterdrop_tunes_malloc_unless_switched_off():
    check = "import waterdrop.allocator as a; print(a.state())"
    assert _python(check) == "tuned"
    assert _python(check, setting="system") == "system"
    # The runtime alone (no torch) gets it too: the scanner's processes and Ray actors import it.
    assert _python("import sys, waterdrop.runtime, waterdrop.allocator as a; "
                   "assert 'torch' not in sys.modules; print(a.state())") == "tuned"


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_a_tiny_run_gives_identical_weights_with_and_without_the_setting(registry_file, tmp_path):
    tuned = _python(TINY_RUN, registry_file, tmp_path / "tuned")
    system = _python(TINY_RUN, registry_file, tmp_path / "system", setting="system")
    assert tuned.split()[0] == "tuned" and system.split()[0] == "system"
    assert tuned.split()[1] == system.split()[1]
