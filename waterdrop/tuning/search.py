"""The search: Optuna's TPE sampler draws recipes; a successive-halving pruner stops trials that trail.

Each trial trains the task alone under its recipe (``waterdrop.engine.train.build_runner``, the
runner ``tools/train.py`` uses) and reports its val score after every epoch. Epochs are a searched
knob, so trials are compared at the same fraction of their schedule (the step is the percentage of
epochs done), never a 2-epoch schedule's end against a 6-epoch schedule's warm-up. The objective is
the best val score of the trial (the checkpoint a run keeps); test is read once, for the winner only.

Optuna rather than Ray Tune: a trial already uses all of a machine's cores, so trials run one after
another; Optuna prunes per epoch in-process and needs no cluster to start.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import optuna
import torch
from mmengine.hooks import Hook

from waterdrop.config import load_registry
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.engine.train import build_runner
from waterdrop.evaluation.evaluate import evaluate
from waterdrop.tuning import report
from waterdrop.tuning.setup import Search, seconds_per_image
from waterdrop.tuning.space import TuneError, read_space, shown

#: Pruning: the first comparison at 30 % of a trial's schedule, the next at 60 %; half go on at each.
FIRST_RUNG_PERCENT, REDUCTION = 30, 2


class BudgetSpent(Exception):
    """The search's time ran out inside a trial."""


class TrialFailed(Exception):
    """A trial that raised: recorded, and the search goes on with the next."""


class TrialHook(Hook):
    """Reports each epoch's val score to Optuna at the percentage of the schedule done, prunes on
    its word (never after the last epoch: that trial is complete), and stops at the deadline."""

    priority = "LOW"

    def __init__(self, trial: optuna.Trial, deadline: float):
        self.trial, self.deadline = trial, deadline
        self.scores: list[float] = []
        self.keep_last = False  # train.checkpoint: last keeps the last epoch, whatever val said before

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if time.time() > self.deadline:
            raise BudgetSpent()

    def after_val_epoch(self, runner, metrics=None) -> None:
        score = float((metrics or {}).get("val/score", float("nan")))
        self.scores.append(score)
        if math.isfinite(score):
            self.trial.report(score, step=math.ceil(100 * len(self.scores) / runner.max_epochs))
        if len(self.scores) < runner.max_epochs and self.trial.should_prune():
            raise optuna.TrialPruned()

    @property
    def best(self) -> float:
        """The val score of the checkpoint the trial keeps: its best epoch's, or with ``keep_last`` its last's."""
        if self.keep_last:
            return self.scores[-1] if self.scores else float("nan")
        finite = [s for s in self.scores if math.isfinite(s)]
        return max(finite) if finite else float("nan")


def _close(runner) -> None:
    """What mmengine closes in ``after_run``, which a pruned or stopped trial never reaches."""
    runner.visualizer.close()
    for handler in runner.logger.handlers:
        handler.close()


def run_search(registry_file: str | Path, task_name: str, budget_s: float, out: Path, space: str | Path | None = None,
               seed: int = 0, max_trials: int | None = None, printer=print) -> dict:
    """Search, evaluate the winner on test, write the outputs under ``out``; returns the summary."""
    started = time.time()
    search = Search(Path(registry_file).resolve(), task_name, read_space(space), default_space=space is None)
    out.mkdir(parents=True, exist_ok=True)
    probe = search.files(search.cheapest()).write(out / "probe")
    cheapest = load_registry(probe)
    # A lower bound: the cheapest recipe's training steps alone (decoding and validation come on top).
    least_trial_s = cheapest.train.epochs * search.train_images * seconds_per_image(probe)
    shutil.rmtree(out / "probe")
    if least_trial_s > budget_s:
        raise TuneError(f"--budget {budget_s:.0f} s is less than one trial of the cheapest recipe in the space "
                        f"({cheapest.train.epochs} epochs x {search.train_images} images at "
                        f"{cheapest.model.input_size} px takes at least {least_trial_s:.0f} s here, measured)")
    printer(f"tuning {task_name}: {len(search.knobs)} knobs, budget {budget_s:.0f} s, {search.train_images} "
            f"training and {search.val_images} val images; one trial takes at least {least_trial_s:.0f} s")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=FIRST_RUNG_PERCENT, reduction_factor=REDUCTION))
    deadline = started + budget_s
    records: list[dict] = []
    leader: dict | None = None

    def trial_folder(record: dict) -> Path:
        return out / "trials" / f"{record['trial']:03d}"

    def objective(trial: optuna.Trial) -> float:
        nonlocal leader
        values = {knob.key: knob.suggest(trial) for knob in search.knobs}
        record = {"trial": trial.number, **values, "state": "running"}
        records.append(record)
        hook = TrialHook(trial, deadline)
        began, runner = time.time(), None
        try:
            cfg = load_registry(search.files(values).write(trial_folder(record)))
            record["epochs"] = cfg.train.epochs
            hook.keep_last = cfg.train.checkpoint == "last"
            runner = build_runner(cfg, trial_folder(record) / "run", printer=lambda *a, **k: None)
            runner.register_hook(hook)
            runner.train()
            record["state"] = "complete"
        except optuna.TrialPruned:
            record["state"] = "pruned"
            raise
        except BudgetSpent as stop:
            record["state"] = "stopped at the budget"
            raise optuna.TrialPruned() from stop
        except Exception as err:  # a recipe that breaks (out of memory, a bad combination) is a result
            record["state"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            raise TrialFailed(record["state"]) from err
        finally:
            if runner is not None:
                _close(runner)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            record.update(seconds=round(time.time() - began, 1), val_by_epoch=[round(s, 4) for s in hook.scores],
                          best_val=hook.best)
            if record["state"] == "complete" and math.isfinite(record["best_val"]):
                if leader is None or record["best_val"] > leader["best_val"]:
                    leader = record
            for other in records:  # a checkpoint that can no longer win is of no further use (logs stay)
                if other is not leader:
                    for checkpoint in (trial_folder(other) / "run").glob("*.pth"):
                        checkpoint.unlink()
            report.write_table(out, search, records)
            printer(f"  trial {trial.number}: {record['state']}, best val {record['best_val']:.4f} after "
                    f"{len(hook.scores)} epochs, {record['seconds']:.0f} s  "
                    + " ".join(f"{k.split('.')[-1]}={shown(v)}" for k, v in values.items()), flush=True)
        return record["best_val"]

    study.optimize(objective, n_trials=max_trials, timeout=max(1.0, deadline - time.time()), catch=(TrialFailed,),
                   gc_after_trial=True)
    if leader is None:
        report.write_plot(out / "search.png", records, task_name)
        raise TuneError(f"no trial finished within the budget of {budget_s:.0f} s ({len(records)} started: "
                        f"{', '.join(sorted({r['state'] for r in records}))}; see {out / 'trials.csv'}); give more "
                        f"time (one trial of the cheapest recipe takes at least {least_trial_s:.0f} s) or fix what "
                        "failed")
    winner_values = {k.key: leader[k.key] for k in search.knobs}
    net, cfg, _ = load_net(best_checkpoint(trial_folder(leader) / "run"))
    winner_report = evaluate(net, cfg, out / "winner_eval", "cuda" if torch.cuda.is_available() else "cpu",
                             val_picked=True)[task_name]  # val chose the winning trial, and so its weights
    search.write_recipe(out / "recipe", winner_values)
    summary = report.summary(search, records, leader, winner_values, winner_report, budget_s, time.time() - started,
                             seed)
    report.write_outputs(out, records, summary)
    return summary
