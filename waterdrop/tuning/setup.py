"""Trial registries for one task, and every check a search makes before its first trial."""

from __future__ import annotations

import copy
import itertools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from waterdrop.config import ConfigError, RegistryConfig, TaskConfig, load_registry
from waterdrop.config.reader import resolve_path
from waterdrop.config.schema import PRESERVED_BY
from waterdrop.engine.model import WaterdropModel
from waterdrop.records import read_records
from waterdrop.tuning.space import SHARED_SECTIONS, TASK_PREFIX, Knob, TuneError, set_dotted

#: Search-space keys whose values can fail only when the model is built.
BUILT_KEYS = ("model.backbone", "model.head_conv", "model.pretrained")


def portable_registry(registry_file: Path, cfg: RegistryConfig) -> dict:
    """The registry YAML with every path the loader resolves made absolute, so another folder can hold it."""
    raw = yaml.safe_load(registry_file.read_text())
    if cfg.demo_data is not None:
        raw["demo_data"] = str(cfg.demo_data)
    model, train = raw["model"], raw.setdefault("train", {})
    if isinstance(cfg.model.pretrained, Path):
        model["pretrained"] = str(cfg.model.pretrained)
    if isinstance(model.get("fusion"), dict) and isinstance(cfg.model.fusion.pretrained, Path):
        model["fusion"]["pretrained"] = str(cfg.model.fusion.pretrained)
    if isinstance(train.get("distillation"), dict):
        train["distillation"]["teacher"] = str(cfg.train.distillation.teacher)
    return raw


def portable_task(task: TaskConfig) -> dict:
    """A task's YAML with its data (resolved against the registry) and files (against the task's folder)
    as absolute paths."""
    raw = yaml.safe_load(task.file.read_text())
    raw["data"] = {"train": str(task.train), "val": str(task.val)}
    for split in ("test", "unlabeled"):
        if getattr(task, split) is not None:
            raw["data"][split] = str(getattr(task, split))
    for key in ("labels", "relations"):
        if isinstance(raw.get(key), str):
            raw[key] = str(resolve_path(task.file.parent, raw[key]))
    return raw


@dataclass
class TrialFiles:
    """A registry and task YAML that train the tuned task alone under one recipe."""

    registry: dict
    task: dict

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "task.yaml").write_text(yaml.safe_dump(self.task, sort_keys=False))
        registry = {**self.registry, "tasks": ["task.yaml"]}
        (folder / "registry.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
        return folder / "registry.yaml"


@dataclass
class Search:
    """What a search needs, checked: the tuned task's data and the space's keys."""

    registry_file: Path
    task_name: str
    knobs: list[Knob]
    #: The built-in space: its augmentation keys that the task's ``augment.preserve`` forbids are left
    #: out (a space the user wrote that names one is refused instead).
    default_space: bool = False
    cfg: RegistryConfig = field(init=False)
    base_registry: dict = field(init=False)
    base_task: dict = field(init=False)
    train_images: int = field(init=False)
    val_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = load_registry(self.registry_file)
        tasks = {t.name: t for t in self.cfg.tasks}
        if self.task_name not in tasks:
            raise TuneError(f"--task {self.task_name}: not in {self.registry_file}; its tasks: {', '.join(tasks)}")
        task = tasks[self.task_name]
        if self.default_space:
            fixed = {f"task.augment.{key}" for prop in task.augment.preserve for key in PRESERVED_BY[prop]}
            self.knobs = [k for k in self.knobs if k.key not in fixed]
        self.train_images, self.val_images = self._check_splits(task)
        registry = portable_registry(self.registry_file, self.cfg)
        registry["demo_data"] = None
        train = registry["train"]
        train["task_sampling"] = {"policy": "size", "weights": {}}  # one task: nothing to weigh
        if isinstance(train.get("distillation"), dict):  # only the tuned task's own entry applies
            own = (train["distillation"].get("tasks") or {}).get(self.task_name)
            train["distillation"]["tasks"] = {self.task_name: own} if own is not None else {}
        self.base_registry, self.base_task = registry, portable_task(task)
        self._check_loads()

    @property
    def other_tasks(self) -> list[str]:
        return [name for name in self.cfg.task_names if name != self.task_name]

    def _check_splits(self, task: TaskConfig) -> tuple[int, int]:
        """Val must be its own images, with positives and negatives: the search is judged on it alone."""
        known = [*task.labels, task.negative_label]
        try:
            train, val = read_records(task.train, known), read_records(task.val, known)
        except (OSError, ValueError) as err:
            raise TuneError(f"{task.name}: {err}") from err
        shared = {r.path.resolve() for r in train} & {r.path.resolve() for r in val}
        if shared:
            raise TuneError(f"{task.name}: {len(shared)} val images are also training images (e.g. "
                            f"{sorted(shared)[0]}); a search judged on images it trains on picks the recipe that "
                            "memorises best. Give data.val its own images")
        positives = sum(any(label in task.labels for label in r.labels) for r in val)
        if positives == 0 or (len(task.labels) == 1 and positives == len(val)):
            raise TuneError(f"{task.name}: its val split {task.val} has {positives} positive and "
                            f"{len(val) - positives} negative images; AP on val, the search's judge, needs both")
        return len(train), len(val)

    def files(self, values: dict[str, Any]) -> TrialFiles:
        registry, task = copy.deepcopy(self.base_registry), copy.deepcopy(self.base_task)
        for key, value in values.items():
            if key.startswith(TASK_PREFIX):
                set_dotted(task, key[len(TASK_PREFIX):], value, f"{self.task_name}'s YAML")
            else:
                set_dotted(registry, key, value)
        return TrialFiles(registry, task)

    def _check_loads(self) -> None:
        """The task alone loads, and so does every key at both ends of its range: an unknown key or an
        out-of-range value fails here, named, before any trial trains."""
        with tempfile.TemporaryDirectory() as scratch:
            try:
                load_registry(self.files({}).write(Path(scratch)))
            except ConfigError as err:
                raise TuneError(f"{self.task_name} does not train alone: {err}") from err
            for knob in self.knobs:
                for value in knob.extremes():
                    try:
                        load_registry(self.files({knob.key: value}).write(Path(scratch)))
                    except ConfigError as err:
                        raise TuneError(f"search space key {knob.key} = {value!r}: {err}") from err
            # A backbone timm lacks, or a head convolution the backbone or its weights lack, fails only when
            # built, and only in some combinations (a ResNet with head_conv: true): every combination is built.
            built = [knob for knob in self.knobs if knob.key in BUILT_KEYS]
            for combination in itertools.product(*(knob.extremes() for knob in built)) if built else ():
                values = dict(zip((knob.key for knob in built), combination))
                try:
                    WaterdropModel(load_registry(self.files(values).write(Path(scratch))))
                except ConfigError as err:
                    named = ", ".join(f"{key} = {value!r}" for key, value in values.items())
                    raise TuneError(f"search space key{'s' if len(values) > 1 else ''} {named}: {err}") from err

    def cheapest(self) -> dict[str, Any]:
        """The values of the keys that set a trial's cost, at their cheapest."""
        return {k.key: k.least() for k in self.knobs if k.key in ("train.epochs", "model.input_size",
                                                                  "model.backbone")}

    def shared_keys(self) -> list[str]:
        return [k.key for k in self.knobs if k.key.startswith(SHARED_SECTIONS)]

    def write_recipe(self, folder: Path, values: dict[str, Any]) -> Path:
        """``folder/registry.yaml``: the user's registry with the winning shared keys, beside a copy of
        every task's YAML (the tuned one with the winning ``task.`` keys), paths made absolute."""
        folder.mkdir(parents=True, exist_ok=True)
        registry = portable_registry(self.registry_file, self.cfg)
        for key, value in values.items():
            if key.startswith(SHARED_SECTIONS):
                set_dotted(registry, key, value)
        tuned = self.files({k: v for k, v in values.items() if k.startswith(TASK_PREFIX)}).task
        names = []
        for task in self.cfg.tasks:
            written = tuned if task.name == self.task_name else portable_task(task)
            (folder / f"{task.name}.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
            names.append(f"{task.name}.yaml")
        registry["tasks"] = names
        (folder / "registry.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
        return folder / "registry.yaml"


def seconds_per_image(registry_file: Path, repeats: int = 3) -> float:
    """Measured seconds of one training step per image (forward, backward, update) on the device the
    trials will use."""
    cfg = load_registry(registry_file)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = WaterdropModel(cfg).net.train().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch, size = cfg.train.batch_size, cfg.model.input_size
    images = torch.rand(batch, 3, size, size, device=device)
    tasks = torch.zeros(batch, dtype=torch.long, device=device)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, enabled=device == "cuda"):
            outputs = net.forward_tasks(images, tasks)
            loss = sum(tensor.float().mean() for task in outputs.values() for tensor in task.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:])) / batch
