"""The optimizer's parameter groups: the shared trunk apart from everything else."""

from __future__ import annotations

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TrunkLrConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups: the shared trunk (``net.trunk``, its per-task BatchNorms included, and
    a fusion model's second backbone) at ``lr x trunk_lr_mult``, the rest (heads, cascade
    networks) at ``lr``, and the learned task-loss weights (``weighting``, uncertainty
    weighting's log-variances) at ``lr`` without weight decay, which would pull every
    log-variance to 0 (weight 1), or at their own ``loss_weight_lr`` where it is set.

    Set ``paramwise_cfg={"trunk_lr_mult": m}``. A few groups rather than mmengine's
    per-parameter groups keep the optimizer step as cheap as without groups.
    """

    def add_params(self, params: list, module, prefix: str = "", is_dcn_module=None) -> None:
        trunk_ids = {id(p) for backbone in module.net.backbones() for p in backbone.parameters()}
        weighting_ids = {id(p) for p in module.weighting.parameters()}
        everything = list(module.parameters())
        params.append({"params": [p for p in everything if id(p) in trunk_ids],
                       "lr": self.base_lr * self.paramwise_cfg["trunk_lr_mult"]})
        params.append({"params": [p for p in everything if id(p) not in trunk_ids | weighting_ids]})
        if weighting_ids:
            group = {"params": [p for p in everything if id(p) in weighting_ids], "weight_decay": 0.0}
            if self.paramwise_cfg.get("loss_weight_lr"):
                group["lr"] = self.paramwise_cfg["loss_weight_lr"]
            params.append(group)
