"""The optimizer's parameter groups: the shared trunk apart from everything else."""

from __future__ import annotations

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TrunkLrConstructor(DefaultOptimWrapperConstructor):
    """Two parameter groups: the shared trunk (``net.trunk``, its per-task BatchNorms
    included) at ``lr x trunk_lr_mult``, and the rest (heads, cascade networks) at ``lr``.

    Set ``paramwise_cfg={"trunk_lr_mult": m}``. Two groups rather than mmengine's
    per-parameter groups keep the optimizer step as cheap as without groups.
    """

    def add_params(self, params: list, module, prefix: str = "", is_dcn_module=None) -> None:
        trunk_ids = {id(p) for p in module.net.trunk.parameters()}
        everything = list(module.parameters())
        params.append({"params": [p for p in everything if id(p) in trunk_ids],
                       "lr": self.base_lr * self.paramwise_cfg["trunk_lr_mult"]})
        params.append({"params": [p for p in everything if id(p) not in trunk_ids]})
