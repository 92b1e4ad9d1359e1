"""tools/tune.py: a budgeted search judged on val, the winner read on test once, errors before any trial."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
import yaml
from conftest import REPO, edit_task

from waterdrop.config import load_registry
from waterdrop.engine.tuning import BudgetSpent, TrialHook, TuneError, parse_budget, run_search

SPACE = {"model.input_size": [40, 48], "train.epochs": [1], "train.optimizer.lr": {"low": 0.001, "high": 0.01,
                                                                                   "log": True},
         "task.augment.color": {"low": 0.0, "high": 0.3}, "task.augment.crop_scale": [[0.6, 1.0], [1.0, 1.0]]}


def write_space(folder, space=SPACE):
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_search_picks_on_val_reads_test_once_and_writes_a_recipe(tmp_path, registry_file, demo_root):
    edit_task(registry_file, "disgusting", data={"test": str(demo_root / "disgusting" / "val.jsonl")})
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
    # Only the winner was evaluated (thresholds on val, report on test); no trial folder holds an evaluation.
    assert (out / "winner_eval" / "metrics.json").is_file()
    assert not list((out / "trials").glob("*/run/eval"))
    assert len(list((out / "trials").glob("*/run/*.pth"))) >= 1
    losers = [r for r in rows if int(r["trial"]) != winner["trial"]]
    assert all(not list((out / "trials" / f"{int(r['trial']):03d}" / "run").glob("*.pth")) for r in losers)
    assert (out / "search.png").stat().st_size > 1000

    recipe = load_registry(out / "recipe" / "registry.yaml")
    assert recipe.model.input_size == winner["values"]["model.input_size"]
    assert recipe.train.lr == pytest.approx(winner["values"]["train.optimizer.lr"])
    tuned = {t.name: t for t in recipe.tasks}
    assert tuned["disgusting"].augment.color == pytest.approx(winner["values"]["task.augment.color"])
    assert list(tuned["disgusting"].augment.crop_scale) == winner["values"]["task.augment.crop_scale"]
    original = load_registry(registry_file)
    assert [t.name for t in recipe.tasks] == original.task_names
    assert tuned["thriller"].file == {t.name: t for t in original.tasks}["thriller"].file  # untouched
    assert summary["other_tasks"] == ["thriller", "scene_tags"]
    assert set(summary["shared_keys"]) == {"model.input_size", "train.epochs", "train.optimizer.lr"}
    assert json.loads((out / "tune.json").read_text())["winner"]["trial"] == winner["trial"]


@pytest.mark.parametrize("space, message", [
    ({"model.not_a_key": [1, 2]}, "model.not_a_key"),
    ({"model.input_size": [0, 64]}, "model.input_size = 0"),
    ({"task.augment.crop_scale": [[0.0, 1.0]]}, "task.augment.crop_scale"),
    ({"optimizer.lr": [0.1]}, "must start with model., train. or task."),
    ({"train.optimizer.lr": {"low": 0.1}}, "train.optimizer.lr"),
])
def test_a_bad_space_is_refused_before_any_trial(tmp_path, registry_file, space, message):
    with pytest.raises(TuneError, match=message.replace(".", r"\.")):
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
    with pytest.raises(TuneError, match="its val split is its training data"):
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
    runner = SimpleNamespace(max_epochs=2)
    hook = TrialHook(FakeTrial(prune=True), deadline=time.time() + 60)
    with pytest.raises(optuna.TrialPruned):
        hook.after_val_epoch(runner, {"val/score": 0.5})
    hook = TrialHook(FakeTrial(prune=True), deadline=time.time() + 60)
    hook.scores = [0.4]
    hook.after_val_epoch(runner, {"val/score": 0.6})  # the last epoch: the trial is complete, not pruned
    assert hook.trial.reported == [(2, 0.6)]
    with pytest.raises(BudgetSpent):
        TrialHook(FakeTrial(prune=False), deadline=time.time() - 1).after_train_iter(runner, 0)


def test_cli_says_what_is_wrong_and_exits_2(tmp_path, registry_file):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "tune.py"), str(registry_file), "--task",
                             "disgusting", "--budget", "soon", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "--budget 'soon': a positive duration" in result.stderr
