"""DDP on CPU (gloo, two processes): the model's own training step runs, and a NaN batch
on one rank is skipped on every rank without a hang."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.conftest import edit_task, edit_train
from waterdrop.engine.distributed import finish_distributed, init_distributed

REPO = Path(__file__).resolve().parents[1]

# Runs under torchrun. Rank 1's second batch gets a NaN loss; every rank reports what it saw.
SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from waterdrop.config import load_registry
from waterdrop.engine.hooks import WaterdropHook
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.distributed import finish_distributed
from waterdrop.engine.train import build_runner

original, calls, seen_skips = WaterdropModel._losses, [], []
after_iter = WaterdropHook.after_train_iter

def record_skips(self, runner, batch_idx, data_batch=None, outputs=None):
    seen_skips.extend(path for _, path in data_batch["skipped"])
    after_iter(self, runner, batch_idx, data_batch, outputs)

WaterdropHook.after_train_iter = record_skips

def poisoned(self, *args, **kwargs):
    losses = original(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2 and dist.get_rank() == 1:
        losses = {key: value * float("nan") for key, value in losses.items()}
    return losses

WaterdropModel._losses = poisoned
runner = build_runner(load_registry(sys.argv[1]), sys.argv[2], launcher="pytorch")
model = runner.model.module
teacher_before = [p.detach().clone() for p in model.deployed.parameters()]
runner.train()
rank = dist.get_rank()
report = {
    "wrapper": type(runner.model).__name__,
    "iters": len(runner.train_dataloader),
    "seen_skips": sorted(set(seen_skips)),
    "steps": len(calls),
    "nonfinite": model.nonfinite_batches,
    "teacher_changed": any(not torch.equal(a, b) for a, b in zip(teacher_before, model.deployed.parameters())),
    "teacher_sum": float(sum(p.double().sum() for p in model.deployed.parameters())),
    "student_sum": float(sum(p.double().sum() for p in model.net.parameters())),
}
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
    json.dump(report, f)
finish_distributed()
"""


def torchrun(*args) -> subprocess.CompletedProcess:
    """Run a script under torchrun with two CPU processes (gloo); it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], capture_output=True, text=True, timeout=420, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def run_two_ranks(script: str, registry_file, work) -> subprocess.CompletedProcess:
    """``script REGISTRY WORK`` under ``torchrun``."""
    path = registry_file.parent / "ddp_script.py"
    path.write_text(script)
    return torchrun(path, registry_file, work)


def test_two_process_gloo_run_uses_our_step_and_skips_a_nan_batch_on_every_rank(registry_file, copy_demo, tmp_path):
    root = copy_demo()
    manifest = root / "disgusting" / "train.jsonl"
    # Every third training image is empty: each rank meets some, and the run must sum them.
    for line in manifest.read_text().splitlines()[::3]:
        (manifest.parent / json.loads(line)["image"]).write_bytes(b"")
    edit_task(registry_file, "disgusting", mean_teacher={"rampup_epochs": 0.5},
              data={"train": str(manifest), "val": str(root / "disgusting" / "val.jsonl"),
                    "unlabeled": str(root / "disgusting" / "unlabeled")})
    work = tmp_path / "run"
    done = run_two_ranks(SCRIPT, registry_file, work)
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["wrapper"] == "WaterdropDDP" for r in ranks)
    assert all(r["steps"] == r["iters"] >= 3 for r in ranks)  # one loss per batch, the NaN one included
    assert [r["nonfinite"] for r in ranks] == [1, 1], ranks  # rank 0's finite batch was skipped too
    assert all(r["teacher_changed"] for r in ranks)  # the EMA update ran under DDP
    assert abs(ranks[0]["student_sum"] - ranks[1]["student_sum"]) < 1e-6 * max(1, abs(ranks[0]["student_sum"]))
    assert abs(ranks[0]["teacher_sum"] - ranks[1]["teacher_sum"]) < 1e-6 * max(1, abs(ranks[0]["teacher_sum"]))
    # Only rank 0 prints: one progress line per log interval (5 in the test registry) and one at the end.
    iters = ranks[0]["iters"]
    expected = len([i for i in range(1, iters + 1) if i % 5 == 0 or i == iters])
    assert done.stdout.count("epoch 1/1  iter") == expected
    # Rank 0 writes the summary, with the skipped images of both ranks.
    summary = json.loads((work / "summary.json").read_text())
    assert summary["nonfinite_batches_skipped"] == 1
    assert ranks[0]["seen_skips"] and ranks[1]["seen_skips"] and ranks[0]["seen_skips"] != ranks[1]["seen_skips"]
    assert summary["skipped_images"]["disgusting"] == sorted(set(ranks[0]["seen_skips"] + ranks[1]["seen_skips"]))


WEIGHTING_SCRIPT = """
import json, sys
import torch.distributed as dist
from waterdrop.config import load_registry
from waterdrop.engine.distributed import finish_distributed
from waterdrop.engine.train import build_runner

runner = build_runner(load_registry(sys.argv[1]), sys.argv[2], launcher="pytorch")
runner.train()
weights = runner.model.module.weighting.task_weights().tolist()
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump({"weights": weights, "iters": len(runner.train_dataloader)}, f)
finish_distributed()
"""


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm"])
def test_learned_loss_weights_agree_on_every_rank(registry_file, tmp_path, method):
    edit_train(registry_file, loss_weighting={"type": method, "lr": 0.05} if method == "gradnorm" else method)
    work = tmp_path / "run"
    run_two_ranks(WEIGHTING_SCRIPT, registry_file, work)
    ranks = [json.loads((work / f"rank{r}.json").read_text())["weights"] for r in (0, 1)]
    assert ranks[0] == pytest.approx(ranks[1], rel=1e-6)  # synchronised: gradients (uncertainty), statistics (gradnorm)
    assert any(abs(w - 1.0) > 1e-4 for w in ranks[0])
    if method == "gradnorm":
        assert sum(ranks[0]) == pytest.approx(3.0, rel=1e-5)


def test_tools_train_under_torchrun_evaluates_on_rank_0_and_every_rank_exits_cleanly(registry_file, tmp_path):
    # The ranks leave the process group together after training; rank 0 then evaluates alone.
    work = tmp_path / "run"
    done = torchrun(REPO / "tools" / "train.py", registry_file, "--work-dir", work, "--launcher", "pytorch")
    assert (work / "eval" / "metrics.json").is_file()
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports


def test_a_process_group_the_caller_started_is_left_to_the_caller(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        init_distributed("pytorch")  # already started: not ours
        finish_distributed()
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
