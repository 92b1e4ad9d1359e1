"""Search the training recipe for one task within a time budget, judged on its val split.

    python tools/tune.py REGISTRY --task TASK --budget 20m [--space SPACE.yaml] [--out DIR]
                         [--max-trials N] [--seed S]

Each trial trains TASK alone under a recipe drawn from the search space (Optuna's TPE sampler)
and reports its val score after every epoch; a trial that trails the others at 30 % and at
60 % of its epochs is stopped early (successive halving: half go on at each). The winner is
the complete trial with the best val score; its checkpoint is then evaluated on TASK's test
split, once: test never chooses (without a test split: on val, marked in-sample). A trial
that fails (out of memory, a combination the model refuses) is recorded and the search goes
on. No trial starts after the budget is spent, and one still running then is stopped; the
winner's evaluation comes on top. The default space: backbone (lite0/1/2), input size, the head
convolution (auto or none), epochs, learning rate, trunk multiplier, a frozen first epoch, crop
scale, colour strength, flips. A space file narrows or widens it, one dotted key per line:

    model.input_size: [192, 224, 256]          # choices
    train.optimizer.lr: {low: 0.0005, high: 0.004, log: true}   # a range (ints: an int range)
    task.augment.crop_scale: [[0.6, 1.0], [1.0, 1.0]]           # task.*: the task's own YAML

Writes under --out (default work_dirs/tune/<task>): trials.csv (every trial: state, recipe,
val score per epoch, seconds), search.png (the search's history and every trial's val curve),
tune.json, winner_eval/ (the winner's report on test) and recipe/registry.yaml: REGISTRY with
the winning model.* and train.* keys, pointing at a copy of TASK's YAML with the winning
task.* keys. model.* and train.* are shared by every task of a registry: applying them changes
the other tasks' training too (the tool says which keys and tasks), so retrain them all and
compare, or keep only the task.* keys.

Exit codes: 0 searched; 2 a bad registry, task, space or budget (said before any trial runs),
or no trial finished within the budget (trials.csv says what each did).
"""

import shutil
import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.config import ConfigError, load_registry
from waterdrop.data.demo import ensure_demo_data
from waterdrop.records import DataError
from waterdrop.tuning import TuneError, parse_budget, run_search


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("registry", help="registry YAML")
    parser.add_argument("--task", required=True, help="the task to tune (trained alone in each trial)")
    parser.add_argument("--budget", required=True, help="wall time for the whole search: 90s, 20m, 1.5h")
    parser.add_argument("--space", help="search space YAML (default: the built-in space)")
    parser.add_argument("--out", help="output folder (default: work_dirs/tune/<task>)")
    parser.add_argument("--max-trials", type=int, help="stop after this many trials even with time left")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    cli.add_overwrite(parser)
    args = cli.start(parser.parse_args())
    try:
        cli.check_registry(args.registry)
        budget = parse_budget(args.budget)
        if args.max_trials is not None and args.max_trials < 1:
            raise cli.UsageError(f"--max-trials {args.max_trials}: at least 1")
        out = cli.output_path(args.out, Path("work_dirs") / "tune" / args.task, args.overwrite)
        if out.exists() and args.overwrite:  # a new search, not trials mixed with an old one's
            if any(out.iterdir()) and not (out / "trials.csv").is_file():
                raise cli.UsageError(f"--out {out}: not the folder of an earlier search (no trials.csv); "
                                     "--overwrite replaces only those")
            shutil.rmtree(out)
        demo = load_registry(args.registry).demo_data
        if demo is not None and ensure_demo_data(demo):
            print(f"generated the demo data in {demo}")
        summary = run_search(args.registry, args.task, budget, out, args.space, args.seed, args.max_trials)
    except (ConfigError, DataError, TuneError, cli.UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    winner = summary["winner"]
    states = ", ".join(f"{n} {state}" for state, n in summary["states"].items() if n)
    print(f"\n{summary['trials']} trials in {summary['took_s']:.0f} s ({states}); winner: trial {winner['trial']}, "
          f"val {winner['best_val']:.4f}")
    for key, value in winner["values"].items():
        print(f"  {key}: {value}")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in winner["metrics"].items() if isinstance(v, float))
    print(f"on {winner['reported_on']}: {metrics}")
    if summary["other_tasks"] and summary["shared_keys"]:
        print(f"note: {', '.join(summary['shared_keys'])} are shared by every task; recipe/registry.yaml applies "
              f"them to {', '.join(summary['other_tasks'])} too. Retrain all tasks with it and compare them "
              f"(tools/compare.py), or keep only the task.* keys in {args.task}'s YAML.")
    print(f"written to {out}: trials.csv, search.png, tune.json, winner_eval/, recipe/registry.yaml")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
