"""A budgeted recipe search for one task of a registry (Optuna: TPE sampling, successive halving).

Each trial trains the task alone, as ``tools/train.py`` would with one registry entry, under a
recipe drawn from the search space; its validation score after every epoch is reported to
Optuna, whose successive-halving pruner stops trials that trail the others at the same epoch.
The objective is the task's best val score (the checkpoint a run keeps); test is read once,
for the winner only. Everything is checked before the first trial: the space's keys against
the registry's schema, the task's val split, and the budget against a measured lower bound on
one trial's time.

Optuna rather than Ray Tune: trials here share one machine's cores (a trial already uses all
of them), so Ray's distribution buys nothing and costs a cluster's start-up per search;
Optuna's study runs in-process, prunes per epoch and keeps its trial table in memory.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import yaml
from mmengine.hooks import Hook

from waterdrop.config import ConfigError, load_registry
from waterdrop.config.reader import resolve_path
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.engine.model import WaterdropModel
from waterdrop.evaluation.evaluate import evaluate
from waterdrop.records import read_records

#: What a search tries when the user names no space: the knobs that moved AP on the real-photo suite.
DEFAULT_SPACE: dict[str, Any] = {
    "model.backbone": ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"],
    "model.input_size": [160, 192, 224, 256],
    "train.epochs": {"low": 2, "high": 6},
    "train.optimizer.lr": {"low": 3e-4, "high": 6e-3, "log": True},
    "train.optimizer.trunk_lr_mult": {"low": 0.1, "high": 1.0, "log": True},
    "train.freeze_trunk_epochs": [0, 1],
    "task.augment.crop_scale": [[0.3, 1.0], [0.6, 1.0], [0.85, 1.0], [1.0, 1.0]],
    "task.augment.color": {"low": 0.0, "high": 0.4},
    "task.augment.hflip": [True, False],
}

#: Sections of the registry a search may change; ``task.`` keys change the tuned task's YAML alone.
SHARED_SECTIONS = ("model.", "train.")
TASK_PREFIX = "task."


class TuneError(ValueError):
    """A search that cannot run as asked: said before any trial starts."""


def parse_budget(text: str) -> float:
    """Seconds from ``90s``, ``20m``, ``1.5h`` or a bare number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise TuneError(f"--budget {text!r}: a positive duration such as 90s, 20m or 1.5h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass
class Knob:
    """One searched key: a list of choices, or a numeric range (int when both ends are ints)."""

    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @classmethod
    def parse(cls, key: str, spec: Any) -> Knob:
        if isinstance(spec, list) and spec:
            return cls(key, choices=spec)
        if isinstance(spec, dict) and set(spec) <= {"low", "high", "log"} and {"low", "high"} <= set(spec):
            low, high = spec["low"], spec["high"]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
            if numbers and low <= high and not (spec.get("log") and low <= 0):
                return cls(key, low=low, high=high, log=bool(spec.get("log", False)))
        raise TuneError(f"search space key {key}: a non-empty list of choices, or {{low: L, high: H, log: "
                        f"true|false}} with L <= H (L > 0 for log); got {spec!r}")

    @property
    def integer(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            # Optuna's choices must be scalars: a list choice (a crop range) travels as its YAML text.
            encoded = [yaml.safe_dump(c, default_flow_style=True).strip() if isinstance(c, list) else c
                       for c in self.choices]
            value = trial.suggest_categorical(self.key, encoded)
            return self.choices[encoded.index(value)]
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        # Three significant digits: a recipe a person reads and keeps, not 0.0013130293256147136.
        return float(f"{trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log):.3g}")

    def extremes(self) -> list:
        """Values that between them reach every bound the schema checks."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def read_space(path: str | Path | None) -> list[Knob]:
    """The knobs of a space YAML (``key: [choices]`` or ``key: {low, high, log}``), or the default space."""
    if path is None:
        spec = DEFAULT_SPACE
    else:
        try:
            spec = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise TuneError(f"--space {path}: {err}") from err
        if not isinstance(spec, dict) or not spec:
            raise TuneError(f"--space {path}: a mapping of dotted keys (e.g. model.input_size) to choices or ranges")
    knobs = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key.startswith((*SHARED_SECTIONS, TASK_PREFIX)) or key.count(".") < 1:
            raise TuneError(f"search space key {key!r}: must start with model., train. or task. (the tuned task's "
                            "own YAML), e.g. model.input_size or task.augment.color")
        knobs.append(Knob.parse(key, value))
    return knobs


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        child = tree.get(key)
        if child is None:
            child = tree[key] = {}
        elif not isinstance(child, dict):
            raise TuneError(f"search space key {dotted}: {key} is not a section of the registry")
        tree = child
    tree[last] = value


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
    """What a search needs, checked: the registry as written, the task's YAML made path-independent."""

    registry_file: Path
    task_name: str
    knobs: list[Knob]
    base_registry: dict = field(init=False)
    base_task: dict = field(init=False)
    other_tasks: list[str] = field(init=False)
    train_images: int = field(init=False)
    val_images: int = field(init=False)

    def __post_init__(self) -> None:
        cfg = load_registry(self.registry_file)
        tasks = {t.name: t for t in cfg.tasks}
        if self.task_name not in tasks:
            raise TuneError(f"--task {self.task_name}: not in {self.registry_file}; its tasks: "
                            f"{', '.join(tasks)}")
        task = tasks[self.task_name]
        self.other_tasks = [name for name in tasks if name != self.task_name]
        if task.val == task.train:
            raise TuneError(f"{task.name}: its val split is its training data ({task.val}); a search judged on "
                            "images it trains on picks the recipe that memorises best. Give data.val its own images")
        known = [*task.labels, task.negative_label]
        try:
            self.train_images = len(read_records(task.train, known))
            self.val_images = len(read_records(task.val, known))
        except (OSError, ValueError) as err:
            raise TuneError(f"{task.name}: {err}") from err
        if self.val_images == 0:
            raise TuneError(f"{task.name}: its val split {task.val} has no labelled images; the search is judged "
                            "on val alone")
        self.base_registry = self._portable_registry(cfg)
        self.base_task = self._portable_task(task)
        self._check_keys()

    def _portable_registry(self, cfg) -> dict:
        """The registry YAML with every relative path made absolute, so a trial folder can hold it."""
        raw = yaml.safe_load(self.registry_file.read_text())
        raw["demo_data"] = None
        if isinstance(cfg.model.pretrained, Path):
            raw["model"]["pretrained"] = str(cfg.model.pretrained)
        fusion = raw["model"].get("fusion")
        if isinstance(fusion, dict) and cfg.model.fusion is not None and isinstance(cfg.model.fusion.pretrained, Path):
            fusion["pretrained"] = str(cfg.model.fusion.pretrained)
        distillation = raw.get("train", {}).get("distillation")
        if isinstance(distillation, dict) and cfg.train.distillation is not None:
            distillation["teacher"] = str(cfg.train.distillation.teacher)
        raw.setdefault("train", {})["task_sampling"] = {"policy": "size", "weights": {}}
        return raw

    def _portable_task(self, task) -> dict:
        raw = yaml.safe_load(task.file.read_text())
        raw["data"] = {"train": str(task.train), "val": str(task.val)}
        if task.test is not None:
            raw["data"]["test"] = str(task.test)
        if task.unlabeled is not None:
            raw["data"]["unlabeled"] = str(task.unlabeled)
        for key in ("labels", "relations"):  # files named relative to the task's folder
            if isinstance(raw.get(key), str):
                raw[key] = str(resolve_path(task.file.parent, raw[key]))
        return raw

    def files(self, values: dict[str, Any]) -> TrialFiles:
        registry, task = copy.deepcopy(self.base_registry), copy.deepcopy(self.base_task)
        for key, value in values.items():
            if key.startswith(TASK_PREFIX):
                set_dotted(task, key[len(TASK_PREFIX):], value)
            else:
                set_dotted(registry, key, value)
        return TrialFiles(registry, task)

    def _check_keys(self) -> None:
        """Every key at both ends of its range must load: an unknown key or an out-of-range value
        fails here, named, before any trial trains."""
        with tempfile.TemporaryDirectory() as scratch:
            for knob in self.knobs:
                for value in knob.extremes():
                    registry_file = self.files({knob.key: value}).write(Path(scratch))
                    try:
                        load_registry(registry_file)
                    except ConfigError as err:
                        raise TuneError(f"search space key {knob.key} = {value!r}: {err}") from err

    def cheapest(self) -> dict[str, Any]:
        """The values that make the fastest trial: fewest epochs, smallest input, first backbone."""
        chosen = {}
        for knob in self.knobs:
            if knob.key in ("train.epochs", "model.input_size"):
                chosen[knob.key] = min(knob.extremes())
            elif knob.key == "model.backbone":
                chosen[knob.key] = knob.extremes()[0]
        return chosen

    def shared_keys(self) -> list[str]:
        return [k.key for k in self.knobs if k.key.startswith(SHARED_SECTIONS)]


def seconds_per_image(registry_file: Path, repeats: int = 3) -> float:
    """Measured seconds of one training step per image (forward, backward, update) on this machine."""
    cfg = load_registry(registry_file)
    model = WaterdropModel(cfg)
    net = model.net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = min(cfg.train.batch_size, 16)
    size = cfg.model.input_size
    images = torch.rand(batch, 3, size, size)
    tasks = torch.zeros(batch, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        outputs = net.forward_tasks(images, tasks)
        loss = sum(tensor.float().mean() for task in outputs.values() for tensor in task.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:])) / batch


class TrialHook(Hook):
    """Reports each epoch's val score to Optuna, prunes on its word, and stops at the budget's end."""

    priority = "LOW"

    def __init__(self, trial: optuna.Trial, deadline: float):
        self.trial, self.deadline = trial, deadline
        self.scores: list[float] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if time.time() > self.deadline:
            raise BudgetSpent()

    def after_val_epoch(self, runner, metrics=None) -> None:
        score = float((metrics or {}).get("val/score", float("nan")))
        self.scores.append(score)
        if math.isfinite(score):
            self.trial.report(score, step=len(self.scores))
        if len(self.scores) < runner.max_epochs and self.trial.should_prune():  # a finished trial is complete
            raise optuna.TrialPruned()


class BudgetSpent(Exception):
    """The search's time ran out inside a trial."""


def run_search(registry_file: str | Path, task_name: str, budget_s: float, out: Path, space: str | Path | None = None,
               seed: int = 0, max_trials: int | None = None, printer=print) -> dict:
    """Search, evaluate the winner on test, write the outputs under ``out``; returns the summary."""
    from waterdrop.engine.train import build_runner  # the runner assembly, not needed to check a search

    started = time.time()
    search = Search(Path(registry_file).resolve(), task_name, read_space(space))
    out.mkdir(parents=True, exist_ok=True)
    probe_registry = search.files(search.cheapest()).write(out / "probe")
    cheapest = load_registry(probe_registry)
    step = seconds_per_image(probe_registry)
    # A lower bound: the cheapest recipe's training steps alone (decoding and validation come on top).
    least_trial_s = cheapest.train.epochs * search.train_images * step
    shutil.rmtree(out / "probe")
    if least_trial_s > budget_s:
        raise TuneError(f"--budget {budget_s:.0f} s is less than one trial of the cheapest recipe in the space "
                        f"({cheapest.train.epochs} epochs x {search.train_images} images at "
                        f"{cheapest.model.input_size} px takes at least {least_trial_s:.0f} s here, measured)")
    printer(f"tuning {task_name}: {len(search.knobs)} knobs, budget {budget_s:.0f} s, "
            f"{search.train_images} training and {search.val_images} val images; one trial takes at least "
            f"{least_trial_s:.0f} s")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    deadline = started + budget_s
    records: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        values = {knob.key: knob.suggest(trial) for knob in search.knobs}
        folder = out / "trials" / f"{trial.number:03d}"
        registry = search.files(values).write(folder)
        cfg = load_registry(registry)
        record = {"trial": trial.number, **{k: v for k, v in values.items()}, "state": "running"}
        records.append(record)
        hook = TrialHook(trial, deadline)
        began = time.time()
        try:
            runner = build_runner(cfg, folder / "run", printer=lambda *a, **k: None)
            runner.register_hook(hook)
            runner.train()
            record["state"] = "complete"
        except optuna.TrialPruned:
            record["state"] = "pruned"
            raise
        except BudgetSpent as stop:
            record["state"] = "stopped at the budget"
            raise optuna.TrialPruned() from stop
        finally:
            record.update(seconds=round(time.time() - began, 1), val_by_epoch=[round(s, 4) for s in hook.scores],
                          best_val=max(hook.scores, default=float("nan")))
            printer(f"  trial {trial.number}: {record['state']}, best val {record['best_val']:.4f} after "
                    f"{len(hook.scores)} epochs, {record['seconds']:.0f} s  " + _describe(values), flush=True)
        return record["best_val"]

    study.optimize(objective, n_trials=max_trials, timeout=budget_s, gc_after_trial=True)
    complete = [r for r in records if r["state"] == "complete" and math.isfinite(r["best_val"])]
    if not complete:
        raise TuneError(f"no trial finished within the budget of {budget_s:.0f} s ({len(records)} started); "
                        f"give more time (one trial of the cheapest recipe takes at least {least_trial_s:.0f} s)")
    winner = max(complete, key=lambda r: r["best_val"])
    winner_values = {k.key: winner[k.key] for k in search.knobs}
    winner_run = out / "trials" / f"{winner['trial']:03d}" / "run"
    net, cfg, _ = load_net(best_checkpoint(winner_run))
    report = evaluate(net, cfg, out / "winner_eval")[task_name]
    for record in records:  # the checkpoints of losing trials are of no further use; their logs stay
        if record is not winner:
            for checkpoint in (out / "trials" / f"{record['trial']:03d}" / "run").glob("*.pth"):
                checkpoint.unlink()
    summary = _summary(search, records, winner, winner_values, report, budget_s, time.time() - started)
    _write_outputs(out, search, study, records, summary)
    return summary


def _describe(values: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def _summary(search: Search, records: list[dict], winner: dict, values: dict, report: dict, budget_s: float,
             took_s: float) -> dict:
    on_test = "test" if report.get("split", "test") == "test" and not report.get("in_sample") else "val (no test split)"
    summary = {
        "task": search.task_name, "registry": str(search.registry_file), "budget_s": budget_s,
        "took_s": round(took_s, 1), "trials": len(records),
        "complete": sum(r["state"] == "complete" for r in records),
        "pruned": sum(r["state"] != "complete" for r in records),
        "winner": {"trial": winner["trial"], "values": values, "best_val": winner["best_val"],
                   "reported_on": on_test, "ap": report.get("ap"), "metrics": _headline(report)},
        "shared_keys": search.shared_keys(), "other_tasks": search.other_tasks,
    }
    return summary


def _headline(report: dict) -> dict:
    return {k: report[k] for k in ("ap", "roc_auc", "map", "macro_f1", "accuracy") if k in report}


def _write_outputs(out: Path, search: Search, study: optuna.Study, records: list[dict], summary: dict) -> None:
    keys = [k.key for k in search.knobs]
    with open(out / "trials.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", "best_val", "epochs_run", "seconds", *keys, "val_by_epoch"])
        for r in records:
            writer.writerow([r["trial"], r["state"], f"{r['best_val']:.4f}", len(r["val_by_epoch"]), r["seconds"],
                             *[_short(r[k]) for k in keys],
                             " ".join(f"{v:.4f}" for v in r["val_by_epoch"])])
    (out / "tune.json").write_text(json.dumps({**summary, "trial_records": records}, indent=2, default=str))
    _write_recipe(out, search, summary["winner"]["values"])
    _plot(out / "search.png", records, summary)


def _write_recipe(out: Path, search: Search, values: dict[str, Any]) -> None:
    """``recipe/registry.yaml``: the user's registry with the winning shared keys, every task as it was
    except the tuned one, whose copy beside it carries the winning ``task.`` keys."""
    recipe = out / "recipe"
    recipe.mkdir(exist_ok=True)
    registry = yaml.safe_load(search.registry_file.read_text())
    for key, value in values.items():
        if key.startswith(SHARED_SECTIONS):
            set_dotted(registry, key, value)
    cfg = load_registry(search.registry_file)
    tuned = search.files({k: v for k, v in values.items() if k.startswith(TASK_PREFIX)}).task
    (recipe / f"{search.task_name}.yaml").write_text(yaml.safe_dump(tuned, sort_keys=False))
    registry["tasks"] = [f"{search.task_name}.yaml" if t.name == search.task_name else str(t.file) for t in cfg.tasks]
    if registry.get("demo_data"):
        registry["demo_data"] = str(cfg.demo_data)
    if isinstance(cfg.model.pretrained, Path):
        registry["model"]["pretrained"] = str(cfg.model.pretrained)
    (recipe / "registry.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))


def _plot(path: Path, records: list[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (history, curves) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"complete": "tab:blue", "pruned": "tab:orange"}
    best = -math.inf
    bests = []
    for r in records:
        colour = colours.get(r["state"], "tab:grey")
        if math.isfinite(r["best_val"]):
            history.scatter(r["trial"], r["best_val"], color=colour, s=25)
        if r["state"] == "complete" and math.isfinite(r["best_val"]):
            best = max(best, r["best_val"])
        bests.append(best if math.isfinite(best) else np.nan)
        curves.plot(range(1, len(r["val_by_epoch"]) + 1), r["val_by_epoch"], marker="o", color=colour, alpha=0.7)
    history.step([r["trial"] for r in records], bests, where="post", color="black", label="best complete trial")
    history.set(xlabel="trial", ylabel="best val score", title=f"{summary['task']}: search history")
    history.legend(loc="lower right")
    curves.set(xlabel="epoch", ylabel="val score", title="val score per epoch (orange: pruned or stopped)")
    for axis in (history, curves):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
