"""glibc malloc tuned (waterdrop's default) against glibc's own settings, on CPU work.

    python benchmarks/allocator.py step [--seconds 20] [--repeats 2]
    python benchmarks/allocator.py command NAME [--fresh PATH ...] -- COMMAND ...

``step``: the model-only training step (tf_efficientnet_lite0, 192 px, batch 32, AdamW,
2 threads) for ``--seconds`` after a warm-up, in its own process per setting, the two
settings taking turns ``--repeats`` times.

``command``: any command (``make demo``, ``tools/find_noisy.py ...``, ``tools/scan.py ...``)
once with ``WATERDROP_MALLOC=system`` and once tuned, in turn; ``--fresh`` paths are deleted
before each run (a run folder that must not exist).

Each row records wall, user and system CPU time, minor page faults and memory (peak and
end-of-run RSS of the largest process, peak PSS of the process tree), appended to
``work_dirs/allocator/results.json``, and the whole table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, machine  # noqa: E402
from cpu_usage import Usage, run_measured  # noqa: E402

SETTINGS = {"system": "system", "tuned": "tuned"}  # row name: WATERDROP_MALLOC
RESULTS = REPO / "work_dirs" / "allocator" / "results.json"


def measure_step(seconds: float) -> dict:
    """In this process: images/s of the training step and where the CPU time went."""
    import timm
    import torch

    import waterdrop.allocator

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images, labels = torch.randn(32, 3, 192, 192), torch.randint(0, 2, (32,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(2):
        step()
    done = 0
    with Usage() as usage:
        while usage.started + seconds > time.perf_counter():
            step()
            done += len(images)
    return dict(usage.record, images_per_s=round(done / usage.record["wall_s"], 2),
                malloc=waterdrop.allocator.state())


def environment(setting: str) -> dict:
    env = dict(os.environ, WATERDROP_MALLOC=setting)
    env.pop("GLIBC_TUNABLES", None)
    return env


def run_steps(args: argparse.Namespace) -> dict:
    rows = {}
    for repeat in range(args.repeats):
        order = list(SETTINGS) if repeat % 2 == 0 else list(SETTINGS)[::-1]
        for name in order:
            done = subprocess.run([sys.executable, __file__, "--measure-step", str(args.seconds)],
                                  env=environment(SETTINGS[name]), capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            record = rows[f"step {name} #{repeat + 1}"] = json.loads(done.stdout.splitlines()[-1])
            print(f"step {name} #{repeat + 1}: {record['images_per_s']} img/s, system share "
                  f"{record['system_share']:.1%}", flush=True)
    return rows


def run_command(args: argparse.Namespace) -> dict:
    rows = {}
    for name, setting in SETTINGS.items():
        for path in args.fresh:
            shutil.rmtree(path, ignore_errors=True)
        record = run_measured(args.command, env=environment(setting), cwd=REPO)
        if record["returncode"] not in (0, 1):  # 1: done, with some inputs that failed (counted)
            raise SystemExit(f"{' '.join(args.command)} failed with {setting}: exit {record['returncode']}")
        rows[f"{args.name} {name}"] = record
        print(f"{args.name} {name}: {record}", flush=True)
    return rows


def table(results: dict) -> str:
    lines = ["| row | wall s | img/s | user s | system s | system share | minor faults (M) | peak RSS MiB | "
             "end RSS MiB | tree peak PSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        peak = r.get("largest_process_peak_rss_mib", r["peak_rss_mib"])
        lines.append(f"| {key} | {r['wall_s']:.0f} | {r.get('images_per_s', '')} | {r['user_s']:.0f} | "
                     f"{r['system_s']:.0f} | {r['system_share']:.1%} | {r['minor_faults_m']:.2f} | {peak} | "
                     f"{r.get('largest_process_end_rss_mib', '')} | {r.get('tree_peak_pss_mib', '')} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--measure-step"]:
        print(json.dumps(measure_step(float(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    step = modes.add_parser("step", help="the model-only training step")
    step.add_argument("--seconds", type=float, default=20)
    step.add_argument("--repeats", type=int, default=2)
    command = modes.add_parser("command", help="any command, both settings")
    command.add_argument("name", help="the rows' name, e.g. 'make demo'")
    command.add_argument("--fresh", nargs="*", default=[], help="paths deleted before each run")
    given = sys.argv[1:]
    split = given.index("--") if "--" in given else len(given)
    args = parser.parse_args(given[:split])
    args.command = given[split + 1 :]
    if args.mode == "command" and not args.command:
        parser.error("give the command after --")
    rows = run_steps(args) if args.mode == "step" else run_command(args)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for row in rows.values():
        row["machine"] = machine()
    results.update(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
