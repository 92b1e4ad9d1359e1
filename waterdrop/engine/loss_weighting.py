"""How the tasks' losses add up: fixed weights, uncertainty weighting, or GradNorm.

* ``fixed``: each task's ``loss_weight`` from its YAML, nothing learned.
* ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): one learned log-variance s per task;
  the task's terms are scaled by exp(-s) and s / 2 is added (their classification form,
  1/sigma^2 L + log sigma). A task whose loss stays high is weighted down. The log-variances
  are trained with the network, without weight decay (``TrunkLrConstructor``).
* ``gradnorm`` (Chen et al., ICML 2018): one weight w per task, kept summing to the number of
  tasks. After each batch the weights move so that every task's gradient norm at the last
  shared layer, ||grad_W (w_i L_i)||, approaches the mean norm times r_i^alpha, where r_i is
  the task's loss relative to its initial loss, over the mean of those ratios: a task that
  trains slower gets more weight. L_i is the head's own supervised terms on the batch's
  labeled samples (not consistency, distillation or loss-prediction terms, whose size follows
  their own schedules), and the initial loss is the mean of the task's first
  ``INITIAL_BATCHES`` batches, so that one odd first batch cannot fix the weights for the
  run. The weights are buffers updated here by a signed step of ``lr``, not by the optimizer.
  Under DDP every rank's norms and losses are averaged (not the norm of the averaged
  gradient), so every rank takes the same step.

Task weights come after each task's ``loss_weight``, which still scales its terms.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from mmengine.dist import is_distributed
from torch import nn

from waterdrop.config import LossWeightingConfig
from waterdrop.features.adapters import TaskConv
from waterdrop.model.cbam import CBAM

INITIAL_BATCHES = 20


def task_of(key: str) -> str:
    """The task a logged term belongs to (``"<task>.<term>"``)."""
    return key.split(".", 1)[0]


def last_shared_weight(trunk: nn.Module) -> nn.Parameter:
    """The weight of the last convolution on the trunk's main path: shared by every task
    (per-task BatchNorm follows it), it is the layer whose gradient norms GradNorm balances.
    Shortcut projections (timm's ``downsample``) and attention (CBAM, squeeze-and-excitation:
    ``se``, ``attn``) are registered after it in a block but are not on the main path."""
    skipped = {name for name, module in trunk.levels[-1].named_modules() if isinstance(module, CBAM)}
    # A convolution that adapters wrap (waterdrop.features.adapters.TaskConv) keeps its shared ``weight``.
    convs = [module for name, module in trunk.levels[-1].named_modules()
             if isinstance(module, (nn.Conv2d, TaskConv))
             and not {"downsample", "se", "attn"} & set(name.split("."))
             and not any(name.startswith(f"{s}.") for s in skipped)]
    return convs[-1].weight


class TaskLossWeighting(nn.Module):
    """Weights the per-task terms of a batch; see the module docstring for the methods.

    ``weigh`` turns ``{"<task>.<term>": loss}`` into the weighted terms plus ``"<task>.weight"``
    (logged, not optimised: no "loss" in the name), so the weights show in the progress line,
    ``results.csv`` and the run's plot. With ``gradnorm`` the trainer calls ``gradnorm_step``
    once per batch before the backward pass.
    """

    def __init__(self, config: LossWeightingConfig, task_names: list[str]):
        super().__init__()
        self.method, self.task_names = config.type, list(task_names)
        self.alpha, self.lr = config.alpha, config.lr
        count = len(task_names)
        if self.method == "uncertainty":
            self.log_variances = nn.Parameter(torch.zeros(count))
        if self.method == "gradnorm":
            self.register_buffer("weights", torch.ones(count))
            # Each task's initial loss (the mean of its first INITIAL_BATCHES batches) and how many
            # batches are in it; GradNorm measures training rates against it.
            self.register_buffer("initial_losses", torch.zeros(count))
            self.register_buffer("initial_batches", torch.zeros(count))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # States saved before the initial loss was a mean have no batch counts, and their first
        # losses included terms GradNorm no longer measures: every task's baseline starts afresh.
        losses_key, batches_key = prefix + "initial_losses", prefix + "initial_batches"
        if self.method == "gradnorm" and losses_key in state_dict and batches_key not in state_dict:
            state_dict[losses_key] = torch.zeros_like(state_dict[losses_key])
            state_dict[batches_key] = torch.zeros_like(state_dict[losses_key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def task_weights(self) -> torch.Tensor:
        """The current weight of every task (ones with ``fixed``)."""
        if self.method == "uncertainty":
            return torch.exp(-self.log_variances.detach())
        if self.method == "gradnorm":
            return self.weights.clone()
        return torch.ones(len(self.task_names))

    def weigh(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.method == "fixed":
            return losses
        weighted = {}
        for key, value in losses.items():
            t = self.task_names.index(task_of(key))
            if self.method == "uncertainty":
                weighted[key] = value * torch.exp(-self.log_variances[t]) if "loss" in key else value
            else:
                weighted[key] = value * self.weights[t] if "loss" in key else value
        for name in dict.fromkeys(task_of(key) for key in losses):
            t = self.task_names.index(name)
            if self.method == "uncertainty":
                weighted[f"{name}.loss_uncertainty"] = self.log_variances[t] / 2
                weighted[f"{name}.weight"] = torch.exp(-self.log_variances[t].detach())
            else:
                weighted[f"{name}.weight"] = self.weights[t].clone()
        return weighted

    def gradnorm_step(self, task_losses: dict[int, torch.Tensor], shared: nn.Parameter,
                      loss_scale: float = 1.0) -> torch.Tensor:
        """One GradNorm update of the weights from this batch's unweighted task losses (by task
        position; tasks without labeled samples in the batch left out).

        ``shared`` is the last shared layer's weight; ``loss_scale`` is the AMP loss scale, so
        that half-precision gradients do not underflow before their norms are taken. Returns
        the per-task gradient norms ||grad_W L_i|| used (0 for absent tasks), averaged over
        DDP ranks.
        """
        count = len(self.task_names)
        # rows: gradient norm of L_i (unweighted), L_i, present (1/0)
        stats = torch.zeros(3, count, device=self.weights.device)
        if not shared.requires_grad:  # the trunk is frozen: there is no shared gradient to balance
            return stats[0]
        for t, loss in task_losses.items():
            grad, = torch.autograd.grad(loss * loss_scale, shared, retain_graph=True, allow_unused=True)
            if grad is None:
                continue
            stats[0, t] = grad.detach().float().norm() / loss_scale
            stats[1, t] = loss.detach().float()
            stats[2, t] = 1.0
        with torch.no_grad():
            if is_distributed():
                dist.all_reduce(stats)
            stats[:2] /= stats[2].clamp(min=1)
            self._update(stats)
        return stats[0]

    def _update(self, stats: torch.Tensor) -> None:
        count = len(self.task_names)
        if not torch.isfinite(stats).all():  # a NaN batch, on this rank or another: it is skipped anyway
            return
        present = stats[2] > 0
        if not present.any():
            return
        norms, task_losses = stats[0][present], stats[1][present]
        seen = self.initial_batches[present]
        settling = seen < INITIAL_BATCHES
        first = self.initial_losses[present]
        first = torch.where(settling, first + (task_losses - first) / (seen + 1), first)
        self.initial_losses[present] = first
        self.initial_batches[present] = seen + settling.float()
        ratios = task_losses / first.clamp(min=1e-12)
        relative = ratios / ratios.mean().clamp(min=1e-12)
        weights = self.weights[present]
        weighted_norms = weights * norms
        mean_norm = weighted_norms.mean().clamp(min=1e-12)
        target = mean_norm * relative.pow(self.alpha)  # a constant of the GradNorm loss
        # d/dw_i of sum_i |w_i g_i - target_i| is sign(w_i g_i - target_i) g_i with g_i > 0. Each
        # weight moves by lr against that sign: a normalised step (what Adam's amounts to for a
        # gradient of steady sign), so it does not depend on the scale of the losses.
        step = torch.sign(weighted_norms - target)
        self.weights[present] = (weights - self.lr * step).clamp(min=1e-3)
        self.weights.mul_(count / self.weights.sum())
