"""What a search leaves: ``trials.csv`` (after every trial), ``search.png``, ``tune.json``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import optuna

from waterdrop import __version__
from waterdrop.engine.train import code_commit
from waterdrop.tuning.setup import Search
from waterdrop.tuning.space import shown

COLOURS = {"complete": "tab:blue", "pruned": "tab:orange", "stopped at the budget": "tab:grey"}


def write_table(out: Path, search: Search, records: list[dict]) -> None:
    keys = [k.key for k in search.knobs]
    with open(out / "trials.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", "best_val", "epochs_run", "seconds", *keys, "val_by_epoch"])
        for r in records:
            if "seconds" not in r:  # still running
                continue
            writer.writerow([r["trial"], r["state"], f"{r['best_val']:.4f}", len(r["val_by_epoch"]), r["seconds"],
                             *[shown(r[k]) for k in keys], " ".join(f"{v:.4f}" for v in r["val_by_epoch"])])


def _state(record: dict) -> str:
    return "failed" if record["state"].startswith("failed") else record["state"]


def summary(search: Search, records: list[dict], winner: dict, values: dict, winner_report: dict, budget_s: float,
            took_s: float, seed: int) -> dict:
    counts = {state: sum(_state(r) == state for r in records)
              for state in ("complete", "pruned", "stopped at the budget", "failed")}
    on = "val (no test split: in-sample)" if winner_report.get("in_sample") else "test"
    return {
        "task": search.task_name, "registry": str(search.registry_file), "budget_s": budget_s,
        "took_s": round(took_s, 1), "trials": len(records), "states": counts, "seed": seed,
        "space": {k.key: k.choices if k.choices is not None else {"low": k.low, "high": k.high, "log": k.log}
                  for k in search.knobs},
        "winner": {"trial": winner["trial"], "values": values, "best_val": winner["best_val"], "reported_on": on,
                   "metrics": {k: winner_report[k] for k in ("ap", "roc_auc", "map") if k in winner_report}},
        "shared_keys": search.shared_keys(), "other_tasks": search.other_tasks,
        "waterdrop": __version__, "git_commit": code_commit(), "optuna": optuna.__version__,
    }


def write_outputs(out: Path, records: list[dict], summary: dict) -> None:
    (out / "tune.json").write_text(json.dumps({**summary, "trial_records": records}, indent=2, default=str))
    write_plot(out / "search.png", records, summary["task"])


def write_plot(path: Path, records: list[dict], task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (history, curves) = plt.subplots(1, 2, figsize=(11, 4))
    best, bests = -math.inf, []
    for r in records:
        colour = COLOURS.get(r["state"], "tab:red")  # red: failed
        if math.isfinite(r.get("best_val", math.nan)):
            history.scatter(r["trial"], r["best_val"], color=colour, s=25)
            if r["state"] == "complete":
                best = max(best, r["best_val"])
        bests.append(best if math.isfinite(best) else np.nan)
        scores = r.get("val_by_epoch", [])
        # x: the share of the trial's schedule done, as the pruner compares them
        epochs = r.get("epochs") or len(scores)
        curves.plot([100 * (i + 1) / max(epochs, 1) for i in range(len(scores))], scores, marker="o", color=colour,
                    alpha=0.7)
    history.step([r["trial"] for r in records], bests, where="post", color="black", label="best complete trial")
    history.set(xlabel="trial", ylabel="best val score", title=f"{task}: search history")
    history.legend(loc="lower right")
    curves.set(xlabel="% of the trial's epochs done", ylabel="val score",
               title="val score (blue complete, orange pruned, grey stopped)")
    for axis in (history, curves):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
