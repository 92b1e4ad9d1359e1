"""Recipes on the real-photo quality suite: the plain loop a team would write, and registry recipes.

    python benchmarks/quality_suite.py                   # builds work_dirs/quality_suite once
    python benchmarks/suite.py [--rows plain default] [--tasks blur noise ...] [--seeds 0 1 2]
        [--copy NEW=ROW] [--set ROW:dotted.key=value] [--out work_dirs/suite] [--results FILE] [--table]

Every task is trained alone from one minimal task YAML, as ``transfer.py`` does; ``plain`` is
``plain_finetune.py`` (same weights, size and epochs, nothing else; ``plain_nohead`` the same loop
without timm's pretrained head convolution, as ``features_only`` trunks are). AP is on ``test``, whose
photographs no run saw; val chose nothing for ``plain`` and the checkpoint for registry rows.
Results accumulate in ``benchmarks/suite_results.json``, kept in the repository because they
take hours to make (a finished row/task/seed is not run again; each result keeps a fingerprint of
its recipe, and a row name reused with another recipe is refused); run folders go under ``--out``;
``--table`` prints the table of what is there: per task the mean test AP over seeds (and, with
more than one seed, ± half the range max - min), the worst task, and the wall times. Registry
rows run ``tools/train.py`` as a command (their whole time counts Python's start-up and the
imports); ``plain`` runs in this process (its whole time is its loop and its test scoring).
``--loto ROW ...`` with ``--table``: leave-one-task-out over those rows. A registry row's results also
give ``ROW@last`` in tables: the same runs scored with the last epoch's weights, not the val-picked ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_finetune  # noqa: E402
from ablation import REPO, machine  # noqa: E402
from quality_suite import TASKS  # noqa: E402
from transfer import row_registries, set_key, task_yaml, write_run_files  # noqa: E402

from waterdrop.engine.checkpoint import best_checkpoint, last_checkpoint  # noqa: E402
from waterdrop.engine.train import code_commit  # noqa: E402

#: Rows of the plain loop, run in-process, and whether each keeps the pretrained head convolution.
PLAIN_ROWS = {"plain": True, "plain_nohead": False}


def fingerprint(recipe) -> str:
    """What a cached result was made with: the row's registry (less its task list, which each run
    replaces), or the plain loop's source. Code changes are not in it: each result names its commit."""
    if not isinstance(recipe, str):
        recipe = json.dumps({k: v for k, v in recipe.items() if k not in ("tasks", "demo_data")}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def run_registry_row(registry: dict, task: str, data: Path, folder: Path, seed: int) -> dict:
    """``tools/train.py`` on a one-task registry, as a user runs it: the whole wall time counts."""
    registry = yaml.safe_load(yaml.safe_dump(registry))
    set_key(registry, "train.seed", seed)
    if folder.exists():
        shutil.rmtree(folder)  # a run that did not finish left no result: start it again
    registry_file = write_run_files(registry, task_yaml(task, data), folder)
    began = time.time()
    subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), str(registry_file), "--work-dir",
                    str(folder / "run"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    total = time.time() - began
    report = json.loads((folder / "run" / "eval" / "metrics.json").read_text())[task]
    timing = json.loads((folder / "run" / "timing.json").read_text())
    return {"test_ap": report["ap"], "val_ap": report.get("val_summary", {}).get("AP"),
            "best_checkpoint": best_checkpoint(folder / "run").name,
            "test_ap_last": last_epoch_ap(folder / "run", task),
            "train_seconds": timing["training_s"], "total_seconds": round(total, 1), "timing": timing}


def last_epoch_ap(run: Path, task: str) -> float:
    """Test AP of the last epoch's weights, as the plain loop keeps them: what picking on val changed."""
    last, best = last_checkpoint(run), best_checkpoint(run)
    if best == last or best.name.endswith(f"_{last.stem}.pth"):  # best_val_score_epoch_3.pth is epoch_3.pth
        return json.loads((run / "eval" / "metrics.json").read_text())[task]["ap"]
    subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), str(last), "--out", str(run / "eval-last"),
                    "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return json.loads((run / "eval-last" / "metrics.json").read_text())[task]["ap"]


def with_last_epoch_rows(results: dict) -> dict:
    """``ROW@last``: each registry result's last-epoch test AP as a row of its own, so that keeping the
    last epoch is judged like any recipe (the same training; only the checkpoint differs)."""
    last = {}
    for key, result in results.items():
        if "test_ap_last" in result:
            row, rest = key.split("/", 1)
            last[f"{row}@last/{rest}"] = {**result, "test_ap": result["test_ap_last"]}
    return {**results, **last}


def print_table(results: dict, rows: list[str], tasks: list[str]) -> None:
    cells: dict[tuple[str, str], list[dict]] = {}
    for key, result in results.items():
        row, task, _ = key.split("/")
        cells.setdefault((row, task), []).append(result)
    rows = [r for r in rows if any((r, t) in cells for t in tasks)]
    print("| recipe | " + " | ".join(tasks) + " | worst | mean | train s / task | run s / task |")
    print("|---|" + "---|" * (len(tasks) + 4))
    for row in rows:
        aps, line, train, total = [], [], [], []
        for task in tasks:
            runs = cells.get((row, task), [])
            if not runs:
                line.append("-")
                continue
            values = [r["test_ap"] for r in runs]
            aps.append(statistics.mean(values))
            spread = f" ±{(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else ""
            line.append(f"{statistics.mean(values):.4f}{spread}")
            train += [r["train_seconds"] for r in runs]
            total += [r.get("total_seconds", r["train_seconds"]) for r in runs]
        worst = f"{min(aps):.4f}" if len(aps) == len(tasks) else "-"
        mean = f"{statistics.mean(aps):.4f}" if len(aps) == len(tasks) else "-"
        print(f"| {row} | " + " | ".join(line) + f" | {worst} | {mean} | {statistics.mean(train):.0f} | "
              f"{statistics.mean(total):.0f} |")
    for row in rows:  # a row whose results span commits may mix code changes into its seed spread
        commits = sorted({str(r.get("commit"))[:8] for t in tasks for r in cells.get((row, t), [])})
        print(f"{row}: results from commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}")


def mean_ap(results: dict, row: str, task: str) -> float | None:
    values = [r["test_ap"] for key, r in results.items() if key.startswith(f"{row}/{task}/")]
    return statistics.mean(values) if values else None


def leave_one_task_out(results: dict, candidates: list[str], tasks: list[str]) -> None:
    """Each task judges the recipe the OTHER tasks chose (by their worst AP): how a default chosen
    on known tasks holds on the next one. The default to ship maximises the worst task of all."""
    table = {(c, t): mean_ap(results, c, t) for c in candidates for t in tasks}
    candidates = [c for c in candidates if all(table[c, t] is not None for t in tasks)]
    if not candidates:
        print("leave-one-task-out: no candidate has results on every task")
        return
    print("\n| held-out task | chosen by the other tasks | its AP there | best candidate for it |")
    print("|---|---|---|---|")
    held_out = []
    for task in tasks:
        others = [t for t in tasks if t != task]
        chosen = max(candidates, key=lambda c: min(table[c, t] for t in others))
        best = max(candidates, key=lambda c: table[c, task])
        held_out.append(table[chosen, task])
        print(f"| {task} | {chosen} | {table[chosen, task]:.4f} | {best} ({table[best, task]:.4f}) |")
    default = max(candidates, key=lambda c: min(table[c, t] for t in tasks))
    print(f"worst held-out task AP {min(held_out):.4f}, mean {statistics.mean(held_out):.4f}; the default by "
          f"the worst task over all tasks: {default} (worst {min(table[default, t] for t in tasks):.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "work_dirs" / "quality_suite"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--rows", nargs="+", default=["plain", "default"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--copy", dest="copies", action="append", default=[], metavar="NEW=ROW")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="ROW:dotted.key=value")
    parser.add_argument("--out", default=str(REPO / "work_dirs" / "suite"), help="run folders")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "suite_results.json"))
    parser.add_argument("--table", action="store_true", help="print the table of the results so far and stop")
    parser.add_argument("--loto", nargs="+", metavar="ROW", help="with --table: leave-one-task-out over these rows")
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out)
    results_file = Path(args.results)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.table:
        results = with_last_epoch_rows(results)
        print_table(results, args.rows, args.tasks)
        if args.loto:
            leave_one_task_out(results, args.loto, args.tasks)
        return
    if not (data / "manifest.json").is_file():
        sys.exit(f"{data}: no suite data; run benchmarks/quality_suite.py first")
    torch.set_num_threads(2)
    base = yaml.safe_load((REPO / "registry.yaml").read_text())
    def alias(row: str) -> str:  # transfer.py calls the repository's registry "finetune"
        return "finetune" if row == "default" else row

    copies = [f"{new}={alias(old)}" for new, old in (c.split("=", 1) for c in args.copies)]
    sets = [f"{alias(row)}:{change}" for row, change in (s.split(":", 1) for s in args.sets)]
    wanted = [r for r in args.rows if r not in PLAIN_ROWS]
    made = row_registries(base, copies, sets, [alias(r) for r in wanted])
    registries = {row: made[alias(row)] for row in wanted}
    recipes = {row: fingerprint(registries[row]) for row in wanted}
    plain_source = (REPO / "benchmarks" / "plain_finetune.py").read_text()
    recipes.update({row: fingerprint(plain_source + ("" if head_conv else "\nhead_conv=False"))
                    for row, head_conv in PLAIN_ROWS.items()})
    for key, result in results.items():
        row = key.split("/")[0]
        if row in args.rows and result.get("recipe") != recipes[row]:
            rename = "" if row in PLAIN_ROWS else f"give the new recipe a new row name (--copy NEW={row}) or "
            sys.exit(f"{key} in {results_file} was made with another recipe than row {row!r} now has (or "
                     f"names none); {rename}move the old results away")
    for seed in args.seeds:
        for task in args.tasks:
            for row in args.rows:
                key = f"{row}/{task}/{seed}"
                if key in results:
                    continue
                if row in PLAIN_ROWS:
                    result = plain_finetune.run(data / task, seed, head_conv=PLAIN_ROWS[row])
                else:
                    result = run_registry_row(registries[row], task, data, out / row / task / str(seed), seed)
                result.update(machine=machine(), recipe=recipes[row], commit=code_commit())
                results[key] = result
                results_file.write_text(json.dumps(results, indent=1))
                print(f"{key}: test AP {result['test_ap']:.4f}  train {result['train_seconds']:.0f} s  "
                      f"whole {result['total_seconds']:.0f} s", flush=True)
    print_table(with_last_epoch_rows(results), args.rows, args.tasks)


if __name__ == "__main__":
    main()
