"""The optimizer's parameter groups: the shared trunk apart from everything else."""

from __future__ import annotations

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn


def parameter_groups(module: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The named parameters of ``WaterdropModel`` ``module`` in the optimizer's groups: the
    trunk, the rest, and the learned task-loss weights where there are any."""
    trunk_ids = {id(p) for backbone in module.net.backbones() for p in backbone.parameters()}
    weighting_ids = {id(p) for p in module.weighting.parameters()}
    everything = list(module.named_parameters())
    groups = [[(n, p) for n, p in everything if id(p) in trunk_ids],
              [(n, p) for n, p in everything if id(p) not in trunk_ids | weighting_ids]]
    return groups + ([[(n, p) for n, p in everything if id(p) in weighting_ids]] if weighting_ids else [])


def reorder_saved_optimizer_state(module: nn.Module, checkpoint: dict) -> None:
    """Match the optimizer state of ``checkpoint`` to today's parameter order.

    torch keeps an optimizer's state by each parameter's position in its groups, and a
    checkpoint written before a module moved (a detector's weights left the multi-label head
    for its feature) lists them in the old order: its state dict's order, renamed as loading
    renames it (the ``_rename_old_keys`` load hooks). Nothing changes where the orders agree.
    """
    saved = checkpoint.get("optimizer", {}).get("state")
    if not saved:
        return
    names = dict.fromkeys(checkpoint["state_dict"])
    for prefix, child in module.named_modules():  # parents first, as load_state_dict renames
        rename = getattr(child, "_rename_old_keys", None)
        if rename is not None:
            rename(child, names, f"{prefix}." if prefix else "")
    rank = {name: position for position, name in enumerate(names)}
    order, offset = {}, 0
    for group in parameter_groups(module):
        today = [name for name, _ in group]
        before = sorted(today, key=lambda name: rank.get(name, len(rank)))
        position = {name: k for k, name in enumerate(before)}
        order.update((offset + k, offset + position[name]) for k, name in enumerate(today))
        offset += len(today)
    checkpoint["optimizer"]["state"] = {new: saved[old] for new, old in order.items() if old in saved}


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TrunkLrConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups: the shared trunk (``net.trunk``, its per-task BatchNorms included, and
    a fusion model's second backbone) at ``lr x trunk_lr_mult``, the rest (heads, the
    features' modules) at ``lr``, and the learned task-loss weights (``weighting``, uncertainty
    weighting's log-variances) at ``lr`` without weight decay, which would pull every
    log-variance to 0 (weight 1), or at their own ``loss_weight_lr`` where it is set.

    Set ``paramwise_cfg={"trunk_lr_mult": m}``. A few groups rather than mmengine's
    per-parameter groups keep the optimizer step as cheap as without groups.
    """

    def add_params(self, params: list, module, prefix: str = "", is_dcn_module=None) -> None:
        groups = [[p for _, p in group] for group in parameter_groups(module)]
        params.append({"params": groups[0], "lr": self.base_lr * self.paramwise_cfg["trunk_lr_mult"]})
        params.append({"params": groups[1]})
        if len(groups) > 2:
            group = {"params": groups[2], "weight_decay": 0.0}
            if self.paramwise_cfg.get("loss_weight_lr"):
                group["lr"] = self.paramwise_cfg["loss_weight_lr"]
            params.append(group)
