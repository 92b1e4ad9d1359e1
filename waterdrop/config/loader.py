"""Load ``registry.yaml`` and ``tasks/*.yaml`` into validated config objects.

Every error names the file, the key, the value found and what was expected. Unknown keys
are errors too: a typo such as ``loss_wieght`` must not silently fall back to a default.
Relative data paths are resolved against the folder of ``registry.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from waterdrop.config.plugins import HeadDeclaration, head_declarations, kind_declarations
from waterdrop.config.reader import Section, read_settings, read_yaml, resolve_path
from waterdrop.config.schema import (
    DEFAULT_MAX_METRIC_DROP,
    DEFAULT_MAX_NEGATIVE_FLIP_RATE,
    DIVERGENCES,
    FEATURE_SETTINGS,
    LOSS_WEIGHTINGS,
    PRESERVED_BY,
    REPEAT_FUNCTIONS,
    SAMPLERS,
    TARGET_METRICS,
    AugmentConfig,
    ConfigError,
    DeployConfig,
    DistillationConfig,
    FusionConfig,
    LossWeightingConfig,
    ModelConfig,
    RegistryConfig,
    SamplerConfig,
    TaskConfig,
    TrainConfig,
)
from waterdrop.relations import RelationError, RelationGraph
from waterdrop.weights import IMAGENET, PACKAGED, packaged_weights


def _load_weights(sec: Section, backbone: str, root: Path) -> tuple[Path | str | None, list[float], list[float]]:
    """``pretrained`` of ``sec`` and the normalisation its weights were trained with; the
    section's own ``mean`` / ``std`` win."""
    pretrained = sec.string("pretrained", None)
    norm_mean, norm_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if pretrained == IMAGENET:
        try:
            entry = packaged_weights(backbone)  # that the package is installed is the trunk's to check
        except ValueError as err:
            raise ConfigError(sec.file, sec.path("pretrained"), str(err)) from err
        norm_mean, norm_std = list(entry.mean), list(entry.std)
    elif pretrained is not None:
        pretrained = resolve_path(root, pretrained)
        if not pretrained.is_file():
            raise sec.fail("pretrained", str(pretrained), f"'{IMAGENET}' (packaged weights of "
                           f"{', '.join(PACKAGED)}) or an existing local weights file (nothing is downloaded)")
    mean, std = sec.raw("mean", norm_mean), sec.raw("std", norm_std)
    for key, value in (("mean", mean), ("std", std)):
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in value)):
            raise sec.fail(key, value, "three RGB numbers in 0..1")
    if any(s == 0 for s in std):
        raise sec.fail("std", std, "non-zero values")
    return pretrained, [float(v) for v in mean], [float(v) for v in std]


def _load_fusion(sec: Section | None, root: Path) -> FusionConfig | None:
    if sec is None:
        return None
    backbone = sec.string("backbone")
    pretrained, mean, std = _load_weights(sec, backbone, root)
    sec.finish()
    return FusionConfig(backbone=backbone, pretrained=pretrained, mean=mean, std=std)


def _load_model(sec: Section, root: Path) -> ModelConfig:
    backbone = sec.string("backbone")
    pretrained, mean, std = _load_weights(sec, backbone, root)
    return read_settings(sec, ModelConfig, backbone=backbone, pretrained=pretrained, mean=mean, std=std,
                         fusion=_load_fusion(sec.optional_section("fusion"), root))


def _load_loss_weighting(sec: Section) -> LossWeightingConfig:
    value = sec.raw("loss_weighting", "fixed")
    if isinstance(value, str):
        return LossWeightingConfig(type=sec.string("loss_weighting", "fixed", LOSS_WEIGHTINGS))
    if not isinstance(value, dict):
        raise sec.fail("loss_weighting", value, "one of " + ", ".join(LOSS_WEIGHTINGS)
                       + ", or {type: gradnorm, alpha: 1.5, lr: 0.025}")
    weighting = sec.section("loss_weighting")
    config = LossWeightingConfig(type=weighting.string("type", "fixed", LOSS_WEIGHTINGS),
                                 alpha=weighting.number("alpha", 1.5, low=0),
                                 lr=weighting.number("lr", None, low=0, low_open=True))
    unused = {"fixed": ["alpha", "lr"], "uncertainty": ["alpha"], "gradnorm": []}[config.type]
    given = [key for key in unused if key in weighting.data]
    if given:
        raise ConfigError(sec.file, weighting.path(given[0]), f"is not a setting of {config.type} (alpha is "
                          "GradNorm's; lr is GradNorm's step or uncertainty weighting's learning rate)")
    weighting.finish()
    return config


def _load_distillation(sec: Section | None, root: Path) -> DistillationConfig | None:
    """The teacher's tasks are checked against the student's when the model is built."""
    if sec is None:
        return None
    teacher = resolve_path(root, sec.string("teacher"))
    if not teacher.exists():
        raise sec.fail("teacher", str(teacher), "an existing run folder or checkpoint of the teacher")
    overrides = sec.section("tasks")
    per_task = {}
    for name in overrides.data:
        own = overrides.section(str(name))
        per_task[str(name)] = {key: own.number(key, low=0, low_open=key == "temperature")
                               for key in ("weight", "temperature") if key in own.data}
        own.finish()
    config = DistillationConfig(teacher=teacher, divergence=sec.string("divergence", "js", DIVERGENCES),
                                weight=sec.number("weight", 1.0, low=0),
                                temperature=sec.number("temperature", 1.0, low=0, low_open=True), tasks=per_task,
                                positive_congruent=sec.boolean("positive_congruent", False),
                                congruent_weight=sec.number("congruent_weight", 5.0, low=0))
    if config.weight == 0 and not any(own.get("weight", 0) > 0 for own in per_task.values()):
        raise ConfigError(sec.file, sec.path("weight"), "is 0 and no task has a weight of its own: it teaches no "
                          "task; set a weight > 0 or set distillation to null")
    sec.finish()
    return config


def _load_train(sec: Section, root: Path) -> TrainConfig:
    return read_settings(sec, TrainConfig, loss_weighting=_load_loss_weighting(sec),
                         distillation=_load_distillation(sec.optional_section("distillation"), root))


def _load_labels(sec: Section, task_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Label names, and child -> [parent] for entries written as ``{name: x, parent: y}``."""
    value = sec.raw("labels")
    if isinstance(value, str):
        label_file = resolve_path(task_dir, value)
        if not label_file.is_file():
            raise sec.fail("labels", value, "a list of label names or an existing .txt file, one label a line")
        value = [ln.strip() for ln in label_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not isinstance(value, list) or not value:
        raise sec.fail("labels", value, "a non-empty list of label names")
    names, parents = [], {}
    for entry in value:
        if isinstance(entry, dict) and set(entry) <= {"name", "parent"} and isinstance(entry.get("name"), str):
            names.append(entry["name"])
            if entry.get("parent") is not None:
                parents[entry["name"]] = [str(entry["parent"])]
        elif isinstance(entry, str) and entry:
            names.append(entry)
        else:
            raise sec.fail("labels", entry, "a label name, or {name: label, parent: label}")
    duplicates = sorted({v for v in names if names.count(v) > 1})
    if duplicates:
        raise sec.fail("labels", duplicates, "unique label names")
    return names, parents


def _load_relations(sec: Section, task_dir: Path, labels: list[str], parents: dict[str, list[str]]) -> RelationGraph:
    """The task's relation graph: ``parent`` entries of ``labels`` plus the ``relations`` file."""
    implies, excludes = {k: list(v) for k, v in parents.items()}, []
    name = sec.string("relations", None)
    where: Path | str = sec.file
    if name is not None:
        where = resolve_path(task_dir, name)
        data = Section(read_yaml(where), where)
        raw_implies, excludes = data.raw("implies", {}), data.raw("excludes", [])
        if not isinstance(raw_implies, dict) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in raw_implies.values()):
            raise data.fail("implies", raw_implies, "a mapping of label -> list of labels it implies")
        if not isinstance(excludes, list) or not all(isinstance(g, list) for g in excludes):
            raise data.fail("excludes", excludes, "a list of label groups, e.g. [[indoor, outdoor]]")
        data.finish()
        for child, implied in raw_implies.items():
            implies.setdefault(str(child), []).extend(implied)
    try:
        return RelationGraph(labels, implies, excludes)
    except RelationError as err:
        raise ConfigError(where, "relations" if where == sec.file else "(graph)", str(err)) from err


def _load_target(sec: Section, key: str) -> tuple[str, float]:
    target = sec.section(key)
    metrics = [m for m in TARGET_METRICS if m in target.data]
    if len(metrics) != 1 or len(target.data) != 1:
        raise sec.fail(key, target.data, "exactly one of: recall, precision (e.g. {recall: 0.95})")
    return metrics[0], target.number(metrics[0], low=0, high=1, low_open=True)


def _load_deploy(sec: Section, labels: list[str], kind) -> DeployConfig:
    """``kind`` (the declaration of the task's kind) says whether a target is required or refused."""
    if not kind.uses_target:
        if "target" in sec.data:
            raise ConfigError(sec.file, sec.path("target"), f"a {kind.name} task chooses no threshold; leave it out")
        metric, value = "recall", 0.95  # unused by kinds without thresholds
    elif "target" not in sec.data:
        raise ConfigError(sec.file, sec.path("target"), "missing (required): what the threshold must reach, "
                          "{recall: x} or {precision: x}")
    else:
        metric, value = _load_target(sec, "target")
    overrides = sec.section("label_targets")
    label_targets = {}
    for label in overrides.data:
        if label not in labels:
            raise ConfigError(sec.file, overrides.path(str(label)), f"unknown label; known labels: {', '.join(labels)}")
        label_targets[label] = _load_target(overrides, label)
    deploy = DeployConfig(
        prevalence=sec.number("prevalence", None, low=0, high=1, low_open=True),
        target_metric=metric,
        target_value=value,
        label_targets=label_targets,
        max_metric_drop=sec.number("max_metric_drop", DEFAULT_MAX_METRIC_DROP, low=0, high=1),
        max_negative_flip_rate=sec.number("max_negative_flip_rate", DEFAULT_MAX_NEGATIVE_FLIP_RATE, low=0, high=1),
    )
    sec.finish()
    return deploy


def _check_head(sec: Section, head_type: str, args: dict[str, Any]) -> HeadDeclaration:
    """The declaration of the registered head ``head.type``, after checking its arguments."""
    heads = head_declarations()
    if head_type not in heads:
        raise sec.fail("type", head_type, "a registered head: " + ", ".join(sorted(heads)))
    head = heads[head_type]
    if "detector" in args and "detector" not in head.args and args["detector"] is None:
        del args["detector"]  # what a multi-label task's YAML used to say for "off"
    if "detector" in args and "detector" not in head.args:
        raise ConfigError(sec.file, sec.path("detector"), "detector assist is a feature of the task now: move "
                          "'detector:' out of 'head:' to the top level of the task YAML")
    for key in args:
        if key not in head.args and not head.any_args:
            raise ConfigError(sec.file, sec.path(key), f"unknown argument of {head_type}; it accepts: "
                              + (", ".join(head.args) or "no arguments"))
    return head


def _load_sampler(sec: Section) -> SamplerConfig:
    if isinstance(sec.raw("sampler", "plain"), str):
        return SamplerConfig(type=sec.string("sampler", "plain", SAMPLERS))
    sampler = sec.section("sampler")
    config = SamplerConfig(type=sampler.string("type", "plain", SAMPLERS),
                           normal_fraction=sampler.number("normal_fraction", 0.5, low=0, high=1),
                           threshold=sampler.number("threshold", 0.1, low=0, high=1, low_open=True),
                           function=sampler.string("function", "sqrt", REPEAT_FUNCTIONS))
    sampler.finish()
    return config


def _check_features(task: TaskConfig, kind) -> None:
    """The per-task features against the task and each other."""
    path, features = task.file, task.features
    if "cascade" in features and kind.name != "binary":
        raise ConfigError(path, "cascade", f"needs a binary head; {task.head_type} is {kind.name}")
    if "detector" in features and kind.name != "multilabel":
        raise ConfigError(path, "detector", f"needs a multi-label head; {task.head_type} is {kind.name}")
    if "detector" in features and task.augment.cutmix > 0:
        raise ConfigError(path, "augment.cutmix", "cutmix cannot be used with a detector (the pasted rectangle would "
                          "carry boxes the targets do not list); set it to 0")
    if task.unlabeled is not None and "mean_teacher" not in features:
        raise ConfigError(path, "data.unlabeled", "unlabeled images are only used by mean_teacher; "
                          "set mean_teacher or set data.unlabeled to null")
    if "mean_teacher" in features and task.augment.cutmix > 0:
        raise ConfigError(path, "augment.cutmix", "cutmix cannot be combined with mean_teacher in one task (the "
                          "teacher's consistency target would be the unmixed image); set one of them off")


def _load_augment(sec: Section) -> AugmentConfig:
    """The task's augmentations, with every one that would change a property in ``preserve``
    turned off; one the YAML sets to a value that would change it is an error, not overridden."""
    augment = read_settings(sec, AugmentConfig)
    given = set(sec.data or {})
    for prop in augment.preserve:
        for key, keeping in PRESERVED_BY[prop].items():
            value = getattr(augment, key)
            if value == keeping:
                continue
            if key in given:
                raise sec.fail(key, list(value) if isinstance(value, tuple) else value,
                               f"{list(keeping) if isinstance(keeping, tuple) else keeping}, because preserve names "
                               f"{prop} and this {key} would change it (or leave {prop} out of preserve)")
            setattr(augment, key, keeping)
    return augment


def load_task(path: Path, root: Path) -> TaskConfig:
    """Read one task YAML; data paths are resolved against ``root``."""
    sec = Section(read_yaml(path), path)
    head = sec.section("head", required=True)
    head_type = head.string("type")
    head_args = {k: v for k, v in head.data.items() if k != "type"}
    kind = kind_declarations()[_check_head(head, head_type, head_args).kind]
    data = sec.section("data", required=True)
    unlabeled, test = data.string("unlabeled", None), data.string("test", None)
    labels, parents = _load_labels(sec, path.parent)
    task = TaskConfig(
        name=sec.string("name"),
        file=path,
        head_type=head_type,
        head_args=head_args,
        labels=labels,
        negative_label=sec.string("negative_label", "normal"),
        train=resolve_path(root, data.string("train")),
        val=resolve_path(root, data.string("val")),
        test=resolve_path(root, test) if test else None,
        unlabeled=resolve_path(root, unlabeled) if unlabeled else None,
        sampler=_load_sampler(sec),
        loss_weight=sec.number("loss_weight", 1.0, low=0),
        deploy=_load_deploy(sec.section("deploy"), labels, kind),
        augment=_load_augment(sec.section("augment")),
        relations=_load_relations(sec, path.parent, labels, parents),
    )
    for key, settings in FEATURE_SETTINGS.items():
        given = sec.optional_section(key)
        if given is not None:
            task.features[key] = read_settings(given, settings, {"labels": labels})
    _check_features(task, kind)
    if not task.name.replace("_", "").isalnum():
        raise sec.fail("name", task.name, "letters, digits and underscores (it names ONNX outputs)")
    if task.negative_label in task.labels:
        raise sec.fail("negative_label", task.negative_label, "a name that is not also in labels")
    if not kind.uses_prevalence and task.deploy.prevalence is not None:
        raise ConfigError(path, "deploy.prevalence", f"is read by binary tasks only; a {kind.name} task does not "
                          "use it; set it to null")
    if not kind.uses_label_targets and task.deploy.label_targets:
        raise ConfigError(path, "deploy.label_targets", f"is for multi-label tasks; a {kind.name} task has no "
                          "per-label thresholds")
    if task.sampler.type not in kind.samplers:
        raise ConfigError(path, "sampler.type", f"{task.sampler.type} is not for {kind.name} tasks; they take: "
                          + ", ".join(kind.samplers))
    for s in (data, sec):
        s.finish()
    return task


def load_registry(path: str | Path) -> RegistryConfig:
    """Read ``registry.yaml`` and every task file it lists."""
    path = Path(path).resolve()
    root = path.parent
    sec = Section(read_yaml(path), path)
    demo = sec.string("demo_data", None)
    model = _load_model(sec.section("model", required=True), root)
    train = _load_train(sec.section("train"), root)
    task_files = sec.raw("tasks")
    if not isinstance(task_files, list) or not task_files or not all(isinstance(t, str) for t in task_files):
        raise sec.fail("tasks", task_files, "a non-empty list of task YAML paths")
    sec.finish()
    tasks = [load_task(resolve_path(root, t), root) for t in task_files]
    names = [t.name for t in tasks]
    for task in tasks:
        if names.count(task.name) > 1:
            raise ConfigError(task.file, "name", f"task name '{task.name}' is used by more than one task file")
    for name in train.sampling_weights:
        if name not in names:
            raise ConfigError(path, "train.task_sampling.weights", f"unknown task '{name}'; tasks: {', '.join(names)}")
    if train.distillation is not None:
        for name in train.distillation.tasks:
            if name not in names:
                raise ConfigError(path, f"train.distillation.tasks.{name}", f"unknown task; tasks: {', '.join(names)}")
    if train.sampling_policy == "weights" and not any(train.sampling_weights.get(n, 0) > 0 for n in names):
        raise ConfigError(path, "train.task_sampling.weights", "policy 'weights' needs a weight > 0 for some task")
    decays = {t.features["mean_teacher"].ema_decay for t in tasks if "mean_teacher" in t.features}
    if len(decays) > 1:
        raise ConfigError(path, "tasks", f"mean_teacher.ema_decay differs between tasks ({sorted(decays)}); the "
                          "teacher is one copy of the shared model, so they must agree")
    return RegistryConfig(file=path, root=root, demo_data=resolve_path(root, demo) if demo else None,
                          model=model, train=train, tasks=tasks)
