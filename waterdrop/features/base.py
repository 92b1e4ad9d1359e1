"""The interface of a per-task feature: an option a task switches on in its YAML that adds
modules to the network, loss terms to training, outputs to the deploy graph or data to the
loader (a cascade's second network, detector assist, loss prediction, mean teacher,
distillation).

A feature is one class in one module of this package, decorated with ``@register_feature``;
its settings are a dataclass in ``waterdrop.config.schema`` (``FEATURE_SETTINGS``) under the
same key. The network, the training wrapper, export, evaluation and explanation call the
hooks below for every feature in use and never name one. Every hook has a default that does
nothing, so a feature implements only the hooks it needs.

One instance serves every task that uses the feature (``self.settings``: task name -> its
settings). ``part_of_network`` features live inside ``MultiTaskNet`` (their modules are saved,
evaluated and exported with it); the others live in the training wrapper and shape training
only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from waterdrop.config import RegistryConfig
    from waterdrop.data.loaders import DataNeeds
    from waterdrop.model.head import Head
    from waterdrop.model.multitask import MultiTaskNet
    from waterdrop.model.trunk import Trunk

_FEATURES: dict[str, type[TaskFeature]] = {}


def register_feature(cls: type[TaskFeature]) -> type[TaskFeature]:
    """Class decorator: the feature runs for every task whose config sets ``cls.key``."""
    existing = _FEATURES.get(cls.key)
    if existing is not None and existing is not cls:
        raise ValueError(f"two features use the key '{cls.key}': {existing.__module__} and {cls.__module__}")
    _FEATURES[cls.key] = cls
    return cls


def registered_features() -> dict[str, type[TaskFeature]]:
    import waterdrop.features  # noqa: F401  (every module of the package registers its feature)

    return dict(_FEATURES)


@dataclass
class LossBatch:
    """What a feature sees of one training batch.

    ``outputs`` are the student's raw outputs per task (``forward_tasks`` with
    ``complete=False``); ``sample_losses`` the head's per-sample loss per task (the sum of its
    terms, mixed under cutmix, detached); ``labeled`` a mask per task; ``mixes`` the cutmix
    of a task, ``(second_target, lam)``; ``extras`` what the loader added to the batch for the
    features (e.g. ``inputs2``, ``boxes``)."""

    net: MultiTaskNet
    images: torch.Tensor
    task_index: torch.Tensor
    targets: dict[str, torch.Tensor]
    labeled: dict[str, torch.Tensor]
    outputs: dict[str, dict[str, torch.Tensor]]
    sample_losses: dict[str, torch.Tensor]
    mixes: dict[str, tuple[torch.Tensor, float]]
    epoch_progress: float
    extras: dict[str, Any] = field(default_factory=dict)

    def rows(self, task: str) -> torch.Tensor:
        """Positions in the batch of ``task``'s samples, in the order of its outputs."""
        return (self.task_index == self.net.task_names.index(task)).nonzero(as_tuple=True)[0]


class TaskFeature(nn.Module):
    """Base of all per-task features.

    Args:
        cfg: the run's config.
        net: the network it is part of, or (``part_of_network`` False) the student it trains;
            fully built up to the features (trunk, heads, ``channels``).
    """

    #: The key of its settings in a task YAML (and in ``TaskConfig.features``).
    key: str = ""
    #: True: its modules are part of the deployed network; False: it shapes training only.
    part_of_network: bool = True

    def __init__(self, cfg: RegistryConfig, net: MultiTaskNet):
        super().__init__()
        self.settings: dict[str, Any] = self.settings_of(cfg)
        #: Every task's ``loss_weight``: a feature's terms are scaled by their task's.
        self.loss_weights = {task.name: task.loss_weight for task in cfg.tasks}
        #: Per-task modules (saved under ``features.<key>.per_task.<task>``).
        self.per_task = nn.ModuleDict()

    @classmethod
    def settings_of(cls, cfg: RegistryConfig) -> dict[str, Any]:
        """Task name -> its settings, for the tasks that use the feature (empty: not in use)."""
        return {task.name: task.features[cls.key] for task in cfg.tasks if task.features.get(cls.key) is not None}

    def renamed_state(self) -> dict[str, str]:
        """Old -> new ``state_dict`` key prefixes (relative to the module the feature is part of)
        for checkpoints written before the feature had a home of its own."""
        return {}

    # The network ------------------------------------------------------------------------

    def add_outputs(self, task: str, feats: list[torch.Tensor], images: torch.Tensor,
                    outputs: dict[str, torch.Tensor], complete: bool, cams: bool) -> None:
        """Add raw outputs of ``task`` to ``outputs`` (its head's, from the task's feature maps
        ``feats`` of ``images``). ``complete`` False: training, where a feature may compute
        costly outputs in ``loss_terms`` on the samples it needs alone. ``cams``: add the
        feature's own class activation maps as ``<name>_cam`` raw outputs."""

    def adjust_predictions(self, task: str, outputs: dict[str, torch.Tensor],
                           predictions: dict[str, torch.Tensor]) -> None:
        """Change or add predictions of ``task`` (``predictions``, the head's ``predict``) from its
        raw ``outputs``: what the task reports and decides, read by evaluation, consistency and
        distillation; each key becomes the ONNX output ``<task>.<key>``."""

    def deploy_outputs(self, task: str, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs of the deploy graph beside ``task``'s predictions (e.g. a predicted loss, a
        map), from its raw ``outputs``; each key becomes the ONNX output ``<task>.<key>``.
        Unlike predictions, training and evaluation do not read them."""
        return {}

    def graph_decisions(self, task: str, predictions: dict[str, torch.Tensor],
                        threshold: Any) -> dict[str, torch.Tensor]:
        """Decisions made inside the exported graph at the chosen ``threshold`` of ``task``."""
        return {}

    def metadata(self, task: str, output_shapes: dict[str, tuple]) -> dict | None:
        """The feature's entry in the task's ONNX metadata (under ``key``); None: none.
        ``output_shapes`` holds the shapes of the task's outputs of an example batch."""
        return None

    def extra_cams(self, task: str) -> dict[str, tuple[str, int]]:
        """The feature's own class activation maps of ``task`` (``add_outputs`` with ``cams``):
        {name in the task's ``cam`` metadata: (output key, feature stride)}."""
        return {}

    def fold_for_export(self) -> None:
        """Turn what the feature computes from its parameters on every pass into constants, on
        the copy of the network that is exported (e.g. adapters folded into convolution weights)."""

    def stages(self, task: str) -> list[tuple[Trunk, Head]]:
        """Further networks that take part in ``task``'s decision (explained as stages 2, 3...)."""
        return []

    # Data, training and evaluation --------------------------------------------------------

    def data_needs(self, task: str, needs: DataNeeds) -> None:
        """Ask the loader of ``task``'s training and evaluation data for what the feature reads."""

    def sample_terms(self, task: str, outputs: dict[str, torch.Tensor], target: torch.Tensor,
                     extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample terms (N,) added to the head's own loss of ``task``, from its raw
        ``outputs``, the head's ``target`` and the loader's ``extras`` of the task's samples:
        left out for unlabeled samples, counted in the per-sample loss that other features rank
        by, and, like the head's, times the task's ``loss_weight`` (not mixed under cutmix: such
        a feature refuses cutmix in config)."""
        return {}

    def loss_terms(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        """Loss terms ``{"<task>.loss_<name>": value}`` for one training batch, already times
        the task's ``loss_weight``; every term name contains ``loss``."""
        return {}

    def after_step(self, student: MultiTaskNet) -> None:
        """Called after every optimizer step."""

    def deployed(self) -> MultiTaskNet | None:
        """The network to validate, evaluate and export instead of the student; None: the student."""
        return None

    def report(self, task: str, predictions: dict[str, Any], truth: Any, extras: dict[str, Any]) -> dict | None:
        """An entry of the task's evaluation report (under ``key``) from the deploy outputs of a
        split (numpy arrays, ``predictions``), the head's truth and the loader's ``extras``
        (numpy, e.g. ``boxes``); None: none. Asked only where ``reports`` is True."""
        return None

    @classmethod
    def format_report(cls, entry: dict) -> list[str]:
        """Lines of the printed evaluation summary for the feature's ``report`` entry."""
        return []

    def reports(self, task: str) -> bool:
        """Whether evaluation keeps every deploy output of ``task`` for ``report``."""
        return False


def build_features(cfg: RegistryConfig, net: MultiTaskNet, part_of_network: bool) -> nn.ModuleDict:
    """The features in use by some task of ``cfg``, keyed by their key."""
    return nn.ModuleDict({key: cls(cfg, net) for key, cls in registered_features().items()
                          if cls.part_of_network == part_of_network and cls.settings_of(cfg)})


def rename_old_keys(features: nn.ModuleDict, state: dict, prefix: str) -> None:
    """Rename in place the keys of ``state`` under ``prefix`` that ``features`` name in
    ``renamed_state``: a load_state_dict pre-hook of the module that holds them."""
    renames = {prefix + old: prefix + new for feature in features.values()
               for old, new in feature.renamed_state().items()}
    if not any(name.startswith(old) for name in state for old in renames):
        return
    renamed = {}
    for name, value in state.items():  # in order: the order of a state dict is its modules' order
        old = next((o for o in renames if name.startswith(o)), None)
        renamed[name if old is None else renames[old] + name[len(old):]] = value
    state.clear()
    state.update(renamed)
