"""The learning-rate (and momentum) schedule of a run, as mmengine parameter schedulers."""

from __future__ import annotations

import math

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.momentum_scheduler import MomentumSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import _ParamScheduler
from mmengine.registry import PARAM_SCHEDULERS

#: torch's OneCycleLR defaults, which a plain fine-tuning loop gets: from peak / 25 up to the
#: peak, down to peak / 25 / 1e4; beta1 (momentum) 0.95 -> 0.85 while the rate rises, then back.
ONECYCLE_LR_FACTORS = (1 / 25, 1.0, 1 / 25 / 1e4)
ONECYCLE_MOMENTUM = (0.95, 0.85, 0.95)


class CosineCycle(_ParamScheduler):
    """Half-cosine from ``values[0]`` to ``values[1]`` over the first ``peak_share`` of
    ``total_steps``, then to ``values[2]`` at the last step: torch's two-phase OneCycleLR, in
    closed form of the step count alone (so a resumed run continues it exactly). With
    ``relative`` the values are factors of each parameter group's own starting value (the trunk
    keeps its ``trunk_lr_mult``), otherwise the values themselves."""

    def __init__(self, optimizer, param_name: str, total_steps: int, peak_share: float,
                 values: tuple[float, float, float], relative: bool, **kwargs):
        self.total_steps, self.values, self.relative = total_steps, tuple(values), relative
        self.peak_step = peak_share * total_steps - 1  # where torch puts the peak
        super().__init__(optimizer, param_name, **{"begin": 0, "end": total_steps, **kwargs, "by_epoch": False})

    def _get_value(self) -> list[float]:
        step, peak, last = self.last_step, self.peak_step, self.total_steps - 1
        if step <= peak:
            start, end, done = self.values[0], self.values[1], step / peak if peak > 0 else 1.0
        else:
            start, end, done = self.values[1], self.values[2], (step - peak) / (last - peak) if last > peak else 1.0
        value = end + (start - end) / 2 * (math.cos(math.pi * min(done, 1.0)) + 1)
        return [base * value if self.relative else value for base in self.base_values]


@PARAM_SCHEDULERS.register_module()
class CosineCycleLR(LRSchedulerMixin, CosineCycle):
    pass


@PARAM_SCHEDULERS.register_module()
class CosineCycleMomentum(MomentumSchedulerMixin, CosineCycle):
    """Cycles SGD's momentum, or beta1 of the Adam family."""


def param_schedulers(schedule: str, epochs: int, warmup_epochs: float, iters_per_epoch: int,
                     cycle_momentum: bool = True) -> list[dict]:
    """mmengine ``param_scheduler`` configs.

    ``cosine``: a linear warm-up from lr / 100 over ``warmup_epochs``, then cosine decay to lr / 100.
    ``onecycle``: torch's OneCycleLR, as a plain fine-tuning loop runs it: the rate rises (half-cosine,
    from lr / 25) for ``warmup_epochs``, falls to almost 0 by the end, and with ``cycle_momentum``
    (AdamW's beta1; SGD keeps the momentum it was given) momentum cycles against it.
    """
    if schedule == "onecycle" and warmup_epochs >= epochs:
        raise ValueError(f"with schedule onecycle the rise ({warmup_epochs} epochs) must end before the last of "
                         f"{epochs} epochs, or the rate never decays")
    warmup = min(warmup_epochs, epochs)
    if warmup * iters_per_epoch < 1:  # a warm-up shorter than one iteration is none (mmengine refuses it)
        warmup = 0
    if schedule == "onecycle":
        steps = epochs * iters_per_epoch
        cycle = {"total_steps": steps, "peak_share": warmup / epochs, "by_epoch": False, "begin": 0, "end": steps}
        momentum = [{"type": "CosineCycleMomentum", "values": ONECYCLE_MOMENTUM, "relative": False, **cycle}]
        return [{"type": "CosineCycleLR", "values": ONECYCLE_LR_FACTORS, "relative": True, **cycle},
                *(momentum if cycle_momentum else [])]
    schedulers = []
    if warmup > 0:
        schedulers.append({"type": "LinearLR", "start_factor": 0.01, "by_epoch": True, "begin": 0, "end": warmup,
                           "convert_to_iter_based": True})
    if epochs > warmup:
        schedulers.append({"type": "CosineAnnealingLR", "by_epoch": True, "begin": warmup, "end": epochs,
                           "T_max": epochs - warmup, "eta_min_ratio": 0.01, "convert_to_iter_based": True})
    return schedulers
