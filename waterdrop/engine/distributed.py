"""DDP through mmengine, on GPUs (nccl) and on CPUs (gloo), running waterdrop's own step.

mmengine 0.10.7's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally, so on a
machine without CUDA the process group is started here with gloo. Its DDP wrapper has a
``train_step`` of its own that would bypass ``WaterdropModel.train_step`` (the teacher's
EMA update, skipping non-finite batches, restoring BatchNorm statistics);
``WaterdropDDP`` hands the step to the model and only lends it the DDP forward, which is
what makes gradients synchronise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from mmengine.dist import init_dist, is_distributed
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS

# The process group started here, if any: one a caller started is the caller's to end.
_started_group = None


def init_distributed(launcher: str) -> None:
    """Start the process group once: nccl through mmengine with CUDA, gloo without."""
    global _started_group
    if launcher == "none" or is_distributed():
        return
    if torch.cuda.is_available():
        init_dist(launcher)
    elif launcher == "pytorch":
        dist.init_process_group("gloo")
    else:
        raise ValueError(f"--launcher {launcher} needs CUDA here; on CPU use torchrun with --launcher pytorch")
    _started_group = dist.group.WORLD


def finish_distributed() -> None:
    """Every rank leaves the process group together. A rank that exits while another still
    works in the group (rank 0 evaluating after training) can abort at shutdown
    (``terminate called without an active exception``), and torchrun then kills the others."""
    global _started_group
    if is_distributed():
        dist.barrier()
        if dist.group.WORLD is _started_group:
            dist.destroy_process_group()
    _started_group = None


def wrapper_config() -> dict:
    """``model_wrapper_cfg`` for the Runner. Tasks absent from a batch leave their BN
    branches and heads without gradients, hence ``find_unused_parameters``. On CPU
    ``device_ids`` must be None (mmengine would pass the local rank)."""
    config = {"type": "WaterdropDDP", "find_unused_parameters": True}
    if not torch.cuda.is_available():
        config["device_ids"] = None
    return config


def all_ranks_agree(flag: bool) -> bool:
    """True only if ``flag`` holds on every rank (a no-op without a process group)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


@MODEL_WRAPPERS.register_module()
class WaterdropDDP(MMDistributedDataParallel):
    """mmengine's DDP wrapper whose training step is the model's own, run through DDP."""

    def train_step(self, data, optim_wrapper):
        return self.module.train_step(data, optim_wrapper, run_forward=self._run_forward)
