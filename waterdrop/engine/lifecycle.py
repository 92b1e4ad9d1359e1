"""Training some tasks of a trained model while the others stay as they are.

The registry is the truth of the new model's task list. Against a parent run (the model in
production) each of its tasks is carried over (in both, not named: its weights, BatchNorm
statistics, head and thresholds unchanged), retrained (in both, named), added (in the
registry alone) or, only when the user says so, retired (in the parent alone). The shared
trunk is frozen; see ``waterdrop.model.lineage`` for what a task owns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from waterdrop.config import ConfigError, RegistryConfig, config_to_dict
from waterdrop.engine.checkpoint import best_checkpoint, first_difference, load_net, recorded_thresholds
from waterdrop.model.lineage import model_hash, model_identity, task_hashes, task_identity
from waterdrop.model.multitask import MultiTaskNet


class PlanError(ValueError):
    """A run from a parent cannot be planned as asked (nothing is written)."""


# What a carried task may change: where its data lives, how it would train, its release gate.
_FREE_KEYS = ("file", "train", "val", "test", "unlabeled", "augment", "sampler", "loss_weight")
_GATE_KEYS = ("max_metric_drop", "max_negative_flip_rate")


@dataclass
class TaskPlan:
    """What a run trained from a parent does with each task, and the parent's record."""

    parent: str
    carried: list[str]
    retrained: list[str]
    added: list[str]
    retired: list[str]
    parent_hashes: dict[str, str]
    parent_thresholds: dict = field(default_factory=dict)
    #: Retrained tasks whose labels, head or features changed: only their BatchNorm copies start
    #: from the parent.
    fresh: list[str] = field(default_factory=list)

    @property
    def trained(self) -> list[str]:
        return self.retrained + self.added

    def status(self, name: str) -> str:
        return next(status for status in ("carried", "retrained", "added") if name in getattr(self, status))

    def changed(self, hashes: dict[str, str]) -> list[str]:
        """The tasks whose content hash (``task_hashes`` of the new model) differs from the parent's."""
        return [name for name, digest in hashes.items() if digest != self.parent_hashes.get(name)]

    def to_dict(self) -> dict:
        return {**asdict(self), "parent_model_hash": model_hash(self.parent_hashes)}

    @classmethod
    def from_dict(cls, data: dict) -> TaskPlan:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def _task_settings(cfg: RegistryConfig) -> dict[str, dict]:
    settings = {}
    for task in config_to_dict(cfg)["tasks"]:
        kept = {k: v for k, v in task.items() if k not in _FREE_KEYS}
        kept["deploy"] = {k: v for k, v in kept["deploy"].items() if k not in _GATE_KEYS}
        settings[task["name"]] = kept
    return settings


def plan_training(cfg: RegistryConfig, parent: str | Path, tasks: list[str] | None,
                  retire: list[str]) -> tuple[TaskPlan, MultiTaskNet]:
    """Check a run trained from ``parent`` (a run folder or checkpoint) and plan it: ``tasks``
    are those to train (None: the registry's tasks the parent lacks), ``retire`` the parent's
    tasks the registry dropped on purpose. Returns the plan and the parent's deployed network.

    Raises:
        PlanError, ConfigError: anything that would make the new model other than asked (before
            a file is written).
    """
    checkpoint = best_checkpoint(parent)
    try:
        parent_net, parent_cfg, meta = load_net(checkpoint)
    except (ValueError, RuntimeError) as err:
        raise PlanError(f"--from {parent}: {err}") from err
    where = f"--from {parent}"
    registry, before = cfg.task_names, parent_cfg.task_names
    if model_identity(cfg) != model_identity(parent_cfg):
        changed = first_difference(model_identity(parent_cfg), model_identity(cfg))
        raise ConfigError(cfg.file, "model", f"differs from the parent's ({where}; first difference: model.{changed}); "
                          "a task can join a trained model only with its trunk and preprocessing")
    if cfg.train.loss_weighting.type == "gradnorm":
        raise ConfigError(cfg.file, "train.loss_weighting", "gradnorm balances the gradients at the shared trunk, "
                          "which a run --from keeps frozen; use fixed or uncertainty")
    if tasks is None:
        tasks = [name for name in registry if name not in before]
        if not tasks:
            raise PlanError(f"{where}: every task of {cfg.file} is in the parent, so nothing would be trained; "
                              "name the tasks to retrain with --tasks")
    for name in tasks:
        if name not in registry:
            hint = ("it is in the parent but not in the registry: list its YAML in the registry to retrain it"
                    if name in before else f"neither the registry ({', '.join(registry)}) nor the parent has it")
            raise PlanError(f"--tasks {name}: {hint}")
    for name in retire:
        if name in registry:
            raise PlanError(f"--retire {name}: the registry still lists it; remove it from {cfg.file} to retire it")
        if name not in before:
            raise PlanError(f"--retire {name}: the parent has no such task (its tasks: {', '.join(before)})")
    dropped = [name for name in before if name not in registry and name not in retire]
    if dropped:
        raise PlanError(f"{where}: the parent's task(s) {', '.join(dropped)} are not in {cfg.file}; a task is "
                          f"retired only on purpose: --retire {' '.join(dropped)} (or list it in the registry again)")
    now, then = _task_settings(cfg), _task_settings(parent_cfg)
    carried = [name for name in registry if name in before and name not in tasks]
    for name in carried:
        if now[name] != then[name]:
            difference = first_difference(then[name], now[name])
            raise ConfigError(cfg.tasks[registry.index(name)].file, difference.split(":")[0],
                              f"task {name} is carried over unchanged from the parent, but this differs from the "
                              f"parent's ({difference}); name it in --tasks to retrain it, or restore the parent's "
                              "settings")
    try:
        thresholds, _ = recorded_thresholds(checkpoint, meta)
    except ValueError as err:
        raise PlanError(f"{where}: {err}") from err
    missing = [name for name in carried if not thresholds or name not in thresholds]
    if missing:
        raise PlanError(f"{where}: no thresholds recorded for {', '.join(missing)}; evaluate the parent first "
                          f"(tools/eval.py {checkpoint})")
    trained = [name for name in registry if name in tasks or name not in before]
    if cfg.train.sampling_policy == "weights" and not any(cfg.train.sampling_weights.get(n, 0) for n in trained):
        raise ConfigError(cfg.file, "train.task_sampling.weights", f"gives every trained task ({', '.join(trained)}) "
                          "weight 0: nothing would be trained")
    plan = TaskPlan(parent=str(checkpoint.resolve()), carried=carried,
                    retrained=[name for name in registry if name in before and name in tasks],
                    added=[name for name in registry if name not in before], retired=list(retire),
                    parent_hashes=task_hashes(parent_net, parent_cfg),
                    parent_thresholds={name: thresholds[name] for name in carried},
                    fresh=[name for name in tasks if name in before and task_identity(cfg.tasks[registry.index(name)])
                           != task_identity(parent_cfg.tasks[before.index(name)])])
    return plan, parent_net


def describe(plan: TaskPlan) -> str:
    lines = [f"training from {plan.parent}: the shared trunk and every task not trained stay frozen"]
    for status in ("carried", "retrained", "added", "retired"):
        names = getattr(plan, status)
        if names:
            lines.append(f"  {status}: {', '.join(names)}")
    return "\n".join(lines)
