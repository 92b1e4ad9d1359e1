"""tools/tune.py: a budgeted search judged on val, the winner read on test once, errors before any trial."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
import yaml
from conftest import REPO, edit_task

from waterdrop.config import load_registry
from waterdrop.engine.train import build_runner
from waterdrop.tuning import TuneError, parse_budget, run_search
from waterdrop.tuning.search import BudgetSpent, TrialHook

SPACE = {"model.input_size": [40, 48], "train.epochs": [1], "train.optimizer.lr": {"low": 0.001, "high": 0.01,
                                                                                   "log": True},
         "task.augment.color": {"low": 0.0, "high": 0.3}, "task.augment.crop_scale": [[0.6, 1.0], [1.0, 1.0]]}


def write_space(folder, space=SPACE):
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def split_val(registry_file, demo_root, tmp_path):
    """disgusting's val lines shared out into a val and a test manifest (both with positives)."""
    lines = (demo_root / "disgusting" / "val.jsonl").read_text().splitlines()
    absolute = [json.dumps({**json.loads(ln), "image": str(demo_root / "disgusting" / json.loads(ln)["image"])})
                for ln in lines]
    for name, part in (("val", absolute[0::2]), ("test", absolute[1::2])):
        assert any(json.loads(ln)["labels"] not in ([], ["normal"]) for ln in part)
        (tmp_path / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    edit_task(registry_file, "disgusting", data={"val": str(tmp_path / "val.jsonl"),
                                                 "test": str(tmp_path / "test.jsonl")})
    return len(absolute[1::2])


def test_search_picks_on_val_reads_test_once_and_writes_a_recipe(tmp_path, registry_file, demo_root):
    test_images = split_val(registry_file, demo_root, tmp_path)
    # Another task's data named relative to the registry: the recipe, in another folder, must still find it.
    thriller = registry_file.parent / "tasks" / "thriller.yaml"
    relative = {split: os.path.relpath(demo_root / "thriller" / f"{split}.jsonl", registry_file.parent)
                for split in ("train", "val")}
    edit_task(registry_file, "thriller", data=relative)
    assert not yaml.safe_load(thriller.read_text())["data"]["train"].startswith("/")
    out = tmp_path / "tune"
    summary = run_search(registry_file, "disgusting", 600, out, write_space(tmp_path), max_trials=3,
                         printer=lambda *a, **k: None)

    with open(out / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == summary["trials"] == 3
    complete = [r for r in rows if r["state"] == "complete"]
    winner = summary["winner"]
    assert winner["best_val"] == pytest.approx(max(float(r["best_val"]) for r in complete), abs=1e-4)
    assert winner["reported_on"] == "test"
    # Only the winner was evaluated (thresholds on val, the report on the test manifest); no trial was.
    evaluated = json.loads((out / "winner_eval" / "metrics.json").read_text())["disgusting"]
    assert evaluated["split"] == "test" and evaluated["count"] == test_images
    assert evaluated["val_picked_checkpoint"]  # val chose the winning trial, whatever train.checkpoint says
    assert not list((out / "trials").glob("*/run/eval"))
    assert list((out / "trials" / f"{winner['trial']:03d}" / "run").glob("*.pth"))
    losers = [r for r in rows if int(r["trial"]) != winner["trial"]]
    assert all(not list((out / "trials" / f"{int(r['trial']):03d}" / "run").glob("*.pth")) for r in losers)
    assert (out / "search.png").stat().st_size > 1000

    recipe = load_registry(out / "recipe" / "registry.yaml")
    original = load_registry(registry_file)
    assert recipe.model.input_size == winner["values"]["model.input_size"]
    assert recipe.train.lr == pytest.approx(winner["values"]["train.optimizer.lr"])
    tuned = {t.name: t for t in recipe.tasks}
    assert tuned["disgusting"].augment.color == pytest.approx(winner["values"]["task.augment.color"])
    assert list(tuned["disgusting"].augment.crop_scale) == winner["values"]["task.augment.crop_scale"]
    assert [t.name for t in recipe.tasks] == original.task_names
    for before, after in zip(original.tasks, recipe.tasks, strict=True):  # every task still finds its data
        assert (after.train, after.val, after.test) == (before.train, before.val, before.test)
        assert after.train.is_file() and after.val.is_file()
    assert tuned["thriller"].augment == {t.name: t for t in original.tasks}["thriller"].augment
    assert summary["other_tasks"] == ["thriller", "scene_tags"]
    assert set(summary["shared_keys"]) == {"model.input_size", "train.epochs", "train.optimizer.lr"}
    assert json.loads((out / "tune.json").read_text())["winner"]["trial"] == winner["trial"]


def test_a_trial_that_fails_is_recorded_and_the_search_goes_on(tmp_path, registry_file, monkeypatch):
    def out_of_memory_at_48(cfg, *args, **kwargs):  # a recipe too big for the machine
        if cfg.model.input_size == 48:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return build_runner(cfg, *args, **kwargs)

    monkeypatch.setattr("waterdrop.tuning.search.build_runner", out_of_memory_at_48)
    space = {"model.input_size": [48, 40], "train.epochs": [1]}
    out = tmp_path / "tune"
    summary = run_search(registry_file, "disgusting", 600, out, write_space(tmp_path, space), max_trials=4,
                         printer=lambda *a, **k: None)
    with open(out / "trials.csv") as handle:
        states = [(r["model.input_size"], r["state"]) for r in csv.DictReader(handle)]
    assert {size for size, _ in states} == {"48", "40"}
    assert all(s == "failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
               for size, s in states if size == "48")
    assert all(s == "complete" for size, s in states if size == "40")
    assert summary["winner"]["values"]["model.input_size"] == 40
    assert summary["states"]["failed"] == sum(size == "48" for size, _ in states)


@pytest.mark.parametrize("space, message", [
    ({"model.not_a_key": [1, 2]}, "model.not_a_key"),
    ({"model.input_size": [0, 64]}, "model.input_size = 0"),
    ({"task.augment.crop_scale": [[0.0, 1.0]]}, "task.augment.crop_scale"),
    ({"optimizer.lr": [0.1]}, "must start with model., train. or task."),
    ({"train.optimizer.lr": {"low": 0.1}}, "train.optimizer.lr"),
    ({"task.augment.sharpen": [1, 2]}, "task.augment.sharpen"),
    ({"model.backbone": ["test_resnet", "no_such_backbone"]}, "unknown timm backbone 'no_such_backbone'"),
    ({"model.head_conv": [False, True]}, "model.head_conv = True: .*test_resnet has none"),
    ({"model.backbone": ["test_efficientnet", "test_resnet"], "model.head_conv": [True]},
     "keys model.backbone = 'test_resnet', model.head_conv = True: .*test_resnet has none"),
    ({"task.mean_teacher.ema_decay": [0.99]}, "mean_teacher is off in disgusting's YAML; turn it on there first"),
])
def test_a_bad_space_is_refused_before_any_trial(tmp_path, registry_file, space, message):
    with pytest.raises(TuneError, match=message.replace(".", r"\.").replace(r"\.*", ".*")):
        run_search(registry_file, "disgusting", 600, tmp_path / "out", write_space(tmp_path, space))
    assert not (tmp_path / "out" / "trials").exists()


def test_a_budget_too_small_for_one_trial_is_refused(tmp_path, registry_file):
    with pytest.raises(TuneError, match="less than one trial of the cheapest recipe"):
        run_search(registry_file, "disgusting", 0.01, tmp_path / "out", write_space(tmp_path))
    assert not (tmp_path / "out" / "trials").exists()


def test_a_task_without_its_own_val_split_or_unknown_is_refused(tmp_path, registry_file, demo_root):
    with pytest.raises(TuneError, match="not in .*; its tasks: disgusting, thriller, scene_tags"):
        run_search(registry_file, "sharpness", 600, tmp_path / "out", write_space(tmp_path))
    edit_task(registry_file, "disgusting", data={"val": str(demo_root / "disgusting" / "train.jsonl")})
    with pytest.raises(TuneError, match="val images are also training images"):
        run_search(registry_file, "disgusting", 600, tmp_path / "out", write_space(tmp_path))
    negatives = [ln for ln in (demo_root / "disgusting" / "val.jsonl").read_text().splitlines()
                 if json.loads(ln)["labels"] in ([], ["normal"])]
    (demo_root / "disgusting" / "val_negatives.jsonl").write_text("\n".join(negatives) + "\n")
    edit_task(registry_file, "disgusting", data={"val": str(demo_root / "disgusting" / "val_negatives.jsonl")})
    with pytest.raises(TuneError, match=f"has 0 positive and {len(negatives)} negative images"):
        run_search(registry_file, "disgusting", 600, tmp_path / "out", write_space(tmp_path))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("45", 45)])
def test_budget_parsing(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["0m", "ten minutes", "-5s", "5d"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(TuneError, match="a positive duration"):
        parse_budget(text)


class FakeTrial:
    def __init__(self, prune: bool):
        self.prune, self.reported = prune, []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return self.prune


def test_trial_hook_prunes_before_the_last_epoch_only_and_stops_at_the_deadline():
    runner = SimpleNamespace(max_epochs=3)
    hook = TrialHook(FakeTrial(prune=True), deadline=time.time() + 60)
    with pytest.raises(optuna.TrialPruned):
        hook.after_val_epoch(runner, {"val/score": 0.5})
    assert hook.trial.reported == [(34, 0.5)]  # steps are the percentage of the schedule done
    hook = TrialHook(FakeTrial(prune=True), deadline=time.time() + 60)
    hook.scores = [float("nan"), 0.4]
    hook.after_val_epoch(runner, {"val/score": 0.6})  # the last epoch: the trial is complete, not pruned
    assert hook.trial.reported == [(100, 0.6)] and hook.best == 0.6  # a NaN epoch does not hide the best
    hook.scores, hook.keep_last = [0.7, 0.6], True  # train.checkpoint: last keeps the last epoch
    assert hook.best == 0.6
    with pytest.raises(BudgetSpent):
        TrialHook(FakeTrial(prune=False), deadline=time.time() - 1).after_train_iter(runner, 0)


def test_cli_says_what_is_wrong_and_exits_2(tmp_path, registry_file):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "tune.py"), str(registry_file), "--task",
                             "disgusting", "--budget", "soon", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "--budget 'soon': a positive duration" in result.stderr


def test_the_built_in_space_leaves_out_what_the_task_preserves(registry_file):
    from waterdrop.tuning.setup import Search
    from waterdrop.tuning.space import read_space

    task_file = registry_file.parent / "tasks" / "thriller.yaml"
    task = yaml.safe_load(task_file.read_text())
    task["augment"] = {"preserve": ["composition"], "color": 0.2}
    task_file.write_text(yaml.safe_dump(task))
    keys = [k.key for k in Search(registry_file, "thriller", read_space(None), default_space=True).knobs]
    assert "task.augment.crop_scale" not in keys and "task.augment.color" in keys and "model.input_size" in keys
    with pytest.raises(TuneError, match="task.augment.crop_scale = \\[0.3, 1.0\\]: .*preserve names composition"):
        Search(registry_file, "thriller", read_space(None))
