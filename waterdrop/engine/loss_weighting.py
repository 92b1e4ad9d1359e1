"""How the tasks' losses add up: fixed weights, uncertainty weighting, or GradNorm.

* ``fixed``: each task's ``loss_weight`` from its YAML, nothing learned.
* ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): one learned log-variance s per task;
  the task's terms are scaled by exp(-s) and s / 2 is added (their classification form,
  1/sigma^2 L + log sigma). A task whose loss stays high is weighted down. The log-variances
  are trained with the network, without weight decay (``TrunkLrConstructor``).
* ``gradnorm`` (Chen et al., ICML 2018): one weight w per task, kept summing to the number of
  tasks. After each batch the weights move so that every task's gradient norm at the last
  shared layer, ||grad_W (w_i L_i)||, approaches the mean norm times r_i^alpha, where r_i is
  the task's loss relative to its first loss, over the mean of those ratios: a task that
  trains slower gets more weight. The weights are buffers updated here by a signed step of
  ``lr``, not by the optimizer.

Task weights come after each task's ``loss_weight``, which still scales its terms.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from mmengine.dist import is_distributed
from torch import nn

from waterdrop.config import LossWeightingConfig


def task_of(key: str) -> str:
    """The task a logged term belongs to (``"<task>.<term>"``)."""
    return key.split(".", 1)[0]


def last_shared_weight(trunk: nn.Module) -> nn.Parameter:
    """The weight of the trunk's last convolution: shared by every task (per-task BatchNorm
    follows it), it is the layer whose gradient norms GradNorm balances."""
    convs = [m for m in trunk.levels[-1].modules() if isinstance(m, nn.Conv2d)]
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
            # The first loss seen of each task; GradNorm measures training rates against it.
            self.register_buffer("initial_losses", torch.full((count,), float("nan")))

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

    def task_losses(self, losses: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each present task's summed terms, by task position."""
        totals: dict[int, torch.Tensor] = {}
        for key, value in losses.items():
            if "loss" in key:
                t = self.task_names.index(task_of(key))
                totals[t] = totals[t] + value if t in totals else value
        return totals

    def gradnorm_step(self, losses: dict[str, torch.Tensor], shared: nn.Parameter, loss_scale: float = 1.0) -> None:
        """One GradNorm update of the weights from this batch's unweighted task losses.

        ``shared`` is the last shared layer's weight; ``loss_scale`` is the AMP loss scale, so
        that half-precision gradients do not underflow before their norms are taken. Under
        DDP the norms and losses are averaged over ranks, so every rank takes the same step.
        """
        if not shared.requires_grad:  # the trunk is frozen: there is no shared gradient to balance
            return
        count = len(self.task_names)
        device = self.weights.device
        # rows: gradient norm of L_i (unweighted), L_i, present (1/0)
        stats = torch.zeros(3, count, device=device)
        for t, loss in self.task_losses(losses).items():
            grad, = torch.autograd.grad(loss * loss_scale, shared, retain_graph=True, allow_unused=True)
            if grad is None:
                continue
            stats[0, t] = grad.detach().float().norm() / loss_scale
            stats[1, t] = loss.detach().float()
            stats[2, t] = 1.0
        with torch.no_grad():
            self._update(stats)

    def _update(self, stats: torch.Tensor) -> None:
        count = len(self.task_names)
        if is_distributed():
            dist.all_reduce(stats)
        if not torch.isfinite(stats).all():  # a NaN batch, on this rank or another: it is skipped anyway
            return
        present = stats[2] > 0
        if not present.any():
            return
        norms = stats[0][present] / stats[2][present]
        task_losses = stats[1][present] / stats[2][present]
        first = self.initial_losses[present]
        first = torch.where(torch.isnan(first), task_losses, first)
        self.initial_losses[present] = first
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
