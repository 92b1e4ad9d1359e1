"""Active learning, simulated: which images to label next, by four strategies, against test AP.

    python benchmarks/real_photos.py                  # builds work_dirs/real_photos once
    python benchmarks/active_learning.py [--tasks demo collage] [--start 0.2] [--step 0.1] [--rounds 2]
        [--epochs 3] [--input-size 128] [--seeds 0] [--strategies random band loss union]
        [--pool-size 320] [--val-size 120] [--demo-scale 0.25] [--out work_dirs/active_learning]

Each task's training split (a stratified ``--pool-size`` subset of it) is the pool. A seeded
random ``--start`` fraction of it is labeled and trained on (the repository's registry:
ImageNet EfficientNet-Lite0, fine-tuned, with ``loss_prediction: {}`` in the task YAML); then
every round each strategy adds ``--step`` of the pool to its labels, chosen by the model of
its previous round, and the model is trained anew on them:

* ``random``: drawn at random (seeded);
* ``band``: the images closest to the task's deploy threshold in log-odds (the confidence
  band of ``tools/select_for_labeling.py``; when the default band holds fewer than the
  budget, the next closest fill it);
* ``loss``: the highest loss predicted by the loss prediction module;
* ``union``: both interleaved.

Every training keeps its last epoch; the threshold is chosen on ``val`` (a stratified
``--val-size`` subset) for the task's target, and AP is measured on the whole ``test``
split. The last row trains on the whole pool. Tasks: ``demo`` is the demo's ``disgusting``
task on hard demo data (small positives, look-alike negatives:
``waterdrop.data.demo.generate(hard=True)``, scaled by ``--demo-scale``), since the default
demo is solved by a few labels; any other name is a real-photo task built by
``benchmarks/real_photos.py`` (e.g. ``collage``). Writes ``report.md``, ``results.json`` and
``active_learning.png`` under ``--out``; for the strategies that score the pool each round
also records how many picks lay in the default band, how many were positives, and the
Spearman correlation of the predicted loss with the cross-entropy of the prediction on the
unlabeled pool (how well the loss prediction module ranks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, fresh_run_folder, write_run_registry  # noqa: E402
from cpu_usage import cpu_model  # noqa: E402
from moderation_ablation import AUGMENT  # noqa: E402
from transfer import task_yaml  # noqa: E402

from waterdrop.config import load_registry
from waterdrop.curation.pool_scores import score_pool, scorer_from_net
from waterdrop.curation.selection import band_ranking, default_band, logit, loss_ranking, union_ranking
from waterdrop.data.demo import generate
from waterdrop.engine.checkpoint import best_checkpoint, load_net
from waterdrop.engine.train import build_runner
from waterdrop.evaluation.evaluate import predict_split
from waterdrop.evaluation.metrics import average_precision
from waterdrop.kinds import kind_of
from waterdrop.kinds.graded import spearman
from waterdrop.records import DataError, read_lines

STRATEGIES = ("random", "band", "loss", "union")


def machine(note: str) -> str:
    import torch

    cpu = cpu_model()
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU only"
    return f"{torch.get_num_threads()}-core {cpu}, {device}" + (f", {note}" if note else "")


def read_items(source: Path) -> list[dict]:
    """A split as manifest items with absolute image paths: a .jsonl manifest or a folder per class."""
    items = []
    for item, problem in read_lines(source):
        if item is None:
            raise DataError(problem)
        items.append(item)
    return items


def stratified(items: list[dict], size: int | None, seed: int) -> list[dict]:
    """``size`` of the items (all when None or more), each label's share kept (largest remainders),
    in their order."""
    if size is None or size >= len(items):
        return items
    rng = np.random.default_rng(seed)
    groups = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item["labels"]), []).append(i)
    shares = {label: size * len(group) / len(items) for label, group in sorted(groups.items())}
    counts = {label: int(share) for label, share in shares.items()}
    for label in sorted(shares, key=lambda k: counts[k] - shares[k])[: size - sum(counts.values())]:
        counts[label] += 1
    keep = {i for label, group in groups.items() for i in rng.permutation(group)[: counts[label]].tolist()}
    return [item for i, item in enumerate(items) if i in keep]


def task_and_pool(name: str, args, seed: int, folder: Path) -> tuple[dict, list[dict]]:
    """The task YAML (loss prediction on; val cut to ``--val-size``) and its training split, cut to
    ``--pool-size``, as manifest items."""
    if name == "demo":
        data = Path(args.out).resolve() / f"hard_demo_{args.demo_scale:g}"
        if not (data / "COMPLETE").is_file():
            generate(data, seed=0, scale=args.demo_scale, hard=True)
        task = yaml.safe_load((REPO / "tasks" / "disgusting.yaml").read_text())
        task["data"] = {split: str(data / "disgusting" / f"{split}.jsonl") for split in ("train", "val", "test")}
        task["augment"] = dict(AUGMENT)  # mild: crops and erasing cut the small positives away
    else:
        task = task_yaml(name, Path(args.data).resolve())
    task["loss_prediction"] = {}
    folder.mkdir(parents=True, exist_ok=True)
    val = folder / "val.jsonl"
    val.write_text(
        "".join(
            json.dumps(item) + "\n" for item in stratified(read_items(Path(task["data"]["val"])), args.val_size, seed)
        )
    )
    task["data"]["val"] = str(val)
    return task, stratified(read_items(Path(task["data"]["train"])), args.pool_size, seed)


class Simulation:
    """Trains one task on chosen subsets of its pool and measures them."""

    def __init__(self, task: dict, pool: list[dict], folder: Path, args, seed: int):
        self.task, self.pool, self.folder, self.seed = task, pool, folder, seed
        self.base = yaml.safe_load((REPO / "registry.yaml").read_text())
        self.model = {"input_size": args.input_size}
        self.epochs = args.epochs
        self.train_seconds = 0.0
        self._scored = None  # (net, unlabeled, scores): round 1 of every strategy scores the same pool

    def train(self, labeled: list[int], name: str):
        """Train on the pool items ``labeled``; returns the best checkpoint's net and config."""
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "labeled.jsonl"
        manifest.write_text("".join(json.dumps(self.pool[i]) + "\n" for i in labeled))
        task = {**self.task, "data": {**self.task["data"], "train": str(manifest)}}
        cfg = load_registry(write_run_registry(self.base, self.model, task, folder, self.seed, self.epochs))
        runner = build_runner(cfg, fresh_run_folder(folder), printer=lambda *a, **k: None)
        # No validation inside training: the last epoch is kept and ``measure`` runs val once
        # (for the threshold); on a shared 2-core machine a pass per epoch costs more than it buys.
        runner._train_loop["val_interval"] = self.epochs + 1
        start = time.perf_counter()
        runner.train()
        self.train_seconds += time.perf_counter() - start
        net, cfg, _ = load_net(best_checkpoint(folder / "run"))
        for checkpoint in (folder / "run").glob("*.pth"):
            checkpoint.unlink()  # 15+ runs per task; only their logs are kept
        return net, cfg

    def measure(self, net, cfg) -> tuple[float, float]:
        """Test AP, and the threshold chosen on val for the task's target."""
        name = self.task["name"]
        task_cfg = cfg.tasks[0]
        val, _, _ = predict_split(net, cfg, "val")
        threshold = kind_of("binary").report(task_cfg, *val[name])["threshold"]
        test, _, _ = predict_split(net, cfg, "test")
        return average_precision(*test[name]), float(threshold)

    def choose(
        self, strategy: str, net, cfg, threshold: float, unlabeled: list[int], budget: int, rng: np.random.Generator
    ) -> tuple[list[int], dict]:
        """``budget`` pool items for ``strategy``, and what the model said about the pool."""
        if strategy == "random":
            return rng.choice(unlabeled, size=budget, replace=False).tolist(), {}
        name = self.task["name"]
        if self._scored is None or self._scored[0] is not net or self._scored[1] != unlabeled:
            scorer = scorer_from_net(net, cfg, name, {name: threshold})
            scores = score_pool(scorer, [Path(self.pool[i]["image"]) for i in unlabeled], workers=2)
            assert len(scores.paths) == len(unlabeled), "the pool holds undecodable images"
            self._scored = net, list(unlabeled), scores
        scores = self._scored[2]
        thresholds = np.array([threshold])
        band = band_ranking(scores.probs, thresholds, 0.0, 1.0)  # all, closest first: the band, then its fill
        loss = loss_ranking(scores.predicted_loss)
        chosen = {
            "band": band.order[:budget],
            "loss": loss.order[:budget],
            "union": np.array([i for i, _, _ in union_ranking([band, loss], budget)]),
        }[strategy]
        low, high = default_band(thresholds)
        probs = scores.probs[chosen, 0]
        truth = np.array(
            [
                self.pool[unlabeled[i]]["labels"] not in ([], [self.task["negative_label"]])
                for i in range(len(unlabeled))
            ]
        )
        # How well the predicted loss orders the pool by the loss of its prediction (cross-entropy).
        entropy = -np.where(
            truth, np.log(np.clip(scores.probs[:, 0], 1e-7, 1)), np.log(np.clip(1 - scores.probs[:, 0], 1e-7, 1))
        )
        info = {
            "in_default_band": int(((probs >= low[0]) & (probs <= high[0])).sum()),
            "positives_chosen": int(truth[chosen].sum()),
            "spearman_predicted_vs_true_loss": spearman(scores.predicted_loss, entropy),
            "mean_abs_logit_distance": float(np.abs(logit(probs) - logit(threshold)).mean()),
        }
        return [unlabeled[i] for i in chosen], info


def simulate(task_name: str, args, seed: int, results: dict, save) -> None:
    folder = Path(args.out).resolve() / f"{task_name}_seed{seed}"
    task, pool = task_and_pool(task_name, args, seed, folder)
    sim = Simulation(task, pool, folder, args, seed)
    size = len(pool)
    start, budget = round(args.start * size), round(args.step * size)
    rng = np.random.default_rng(seed)
    initial = sorted(rng.permutation(size)[:start].tolist())
    entry = results.setdefault(f"{task_name}/seed{seed}", {"pool": size, "budget": budget, "curves": {}})
    began = time.perf_counter()
    net, cfg = sim.train(initial, "start")
    ap, threshold = sim.measure(net, cfg)
    print(f"{task_name} seed {seed}: {start}/{size} labels, test AP {ap:.4f}", flush=True)
    for strategy in args.strategies:
        labeled, current, current_threshold = list(initial), (net, cfg), threshold
        curve = [{"labels": len(labeled), "fraction": len(labeled) / size, "ap": ap}]
        strategy_rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
        for round_ in range(1, args.rounds + 1):
            taken = set(labeled)
            unlabeled = [i for i in range(size) if i not in taken]
            picks, info = sim.choose(strategy, *current, current_threshold, unlabeled, budget, strategy_rng)
            labeled += picks
            current = sim.train(sorted(labeled), f"{strategy}_round{round_}")
            round_ap, current_threshold = sim.measure(*current)
            curve.append({"labels": len(labeled), "fraction": len(labeled) / size, "ap": round_ap, **info})
            print(
                f"  {strategy} round {round_}: {len(labeled)}/{size} labels, test AP {round_ap:.4f} {info}", flush=True
            )
        entry["curves"][strategy] = curve
        save()
    full_ap, _ = sim.measure(*sim.train(list(range(size)), "all_labels"))
    entry.update(
        all_labels_ap=full_ap, wall_minutes=(time.perf_counter() - began) / 60, train_minutes=sim.train_seconds / 60
    )
    print(f"  all {size} labels: test AP {full_ap:.4f}", flush=True)
    save()


def reached(curve: list[dict], target: float) -> str:
    """The first label fraction whose AP reaches ``target``, or '-'."""
    return next((f"{point['fraction']:.0%}" for point in curve if point["ap"] >= target), "-")


def report(results: dict, settings: dict) -> list[str]:
    lines = [f"Active learning, simulated (`benchmarks/active_learning.py`). {settings['description']}", ""]
    for key, entry in results.items():
        if "all_labels_ap" not in entry:
            continue
        strategies = [s for s in STRATEGIES if s in entry["curves"]]
        lines += [
            f"**{key}** ({entry['pool']} images in the pool, {entry['budget']} added per round; "
            f"{entry['wall_minutes']:.1f} min, of which training {entry['train_minutes']:.1f} min)",
            "",
            "| labels used | " + " | ".join(strategies) + " |",
            "|---|" + "---|" * len(strategies),
        ]
        for row, point in enumerate(entry["curves"][strategies[0]]):
            cells = [f"{entry['curves'][s][row]['ap']:.4f}" for s in strategies]
            lines.append(f"| {point['labels']} ({point['fraction']:.0%}) | " + " | ".join(cells) + " |")
        full = entry["all_labels_ap"]
        lines.append(f"| all {entry['pool']} (100%) | " + " | ".join(f"{full:.4f}" for _ in strategies) + " |")
        for label, target in (("all-labels AP", full), ("all-labels AP - 0.01", full - 0.01)):
            lines.append(
                f"| first reaching {label} | "
                + " | ".join(reached(entry["curves"][s], target) for s in strategies)
                + " |"
            )
        lines += [
            "",
            "What each strategy picked (from the model of the round before) and how well the loss "
            "prediction module ranked the unlabeled pool (Spearman of the predicted loss with the "
            "cross-entropy of the prediction):",
            "",
            "| labels after | strategy | positives picked | picks in the default band | Spearman |",
            "|---|---|---|---|---|",
        ]
        for strategy in strategies:
            for point in entry["curves"][strategy][1:]:
                if "positives_chosen" in point:
                    lines.append(
                        f"| {point['labels']} | {strategy} | {point['positives_chosen']} / {entry['budget']} "
                        f"| {point['in_default_band']} | {point['spearman_predicted_vs_true_loss']:.2f} |"
                    )
        lines.append("")
    minutes = settings.get("wall_minutes", sum(e.get("wall_minutes", 0) for e in results.values()))
    lines.append(f"Wall time of the whole benchmark: {minutes:.1f} min.")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {k: v for k, v in results.items() if "all_labels_ap" in v}
    fig, axes = plt.subplots(1, max(1, len(done)), figsize=(5.5 * max(1, len(done)), 4), squeeze=False)
    for ax, (key, entry) in zip(axes[0], done.items()):
        for strategy, curve in entry["curves"].items():
            ax.plot([100 * p["fraction"] for p in curve], [p["ap"] for p in curve], marker="o", label=strategy)
        ax.axhline(entry["all_labels_ap"], color="black", linestyle="--", label="all labels")
        ax.set(title=key, xlabel="labels used (% of the pool)", ylabel="test AP")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["demo", "collage"])
    parser.add_argument("--data", default=str(REPO / "work_dirs" / "real_photos"), help="real-photo tasks' folder")
    parser.add_argument("--start", type=float, default=0.2, help="fraction of the pool labeled at first")
    parser.add_argument("--step", type=float, default=0.1, help="fraction of the pool added per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument(
        "--demo-scale",
        type=float,
        default=0.25,
        help="size of the hard demo data (1 = 1400 training, 800 val, 800 test images)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=320,
        help="training images per task used as the pool (stratified subset; 0 = all)",
    )
    parser.add_argument("--val-size", type=int, default=120, help="validation images per task (stratified; 0 = all)")
    parser.add_argument("--machine-note", default="", help="added to the machine's name in the report")
    parser.add_argument("--out", default=str(REPO / "work_dirs" / "active_learning"))
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md and the plot from results.json")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        write_report(Path(args.out), saved["results"], saved["settings"])
        return 0
    args.pool_size, args.val_size = args.pool_size or None, args.val_size or None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if any(t != "demo" for t in args.tasks) and not (Path(args.data) / "manifest.json").is_file():
        sys.exit(f"{args.data}: no real-photo data; run benchmarks/real_photos.py first")
    settings = {
        "tasks": args.tasks,
        "start": args.start,
        "step": args.step,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "input_size": args.input_size,
        "seeds": args.seeds,
        "demo_scale": args.demo_scale,
        "pool_size": args.pool_size,
        "val_size": args.val_size,
        "machine": machine(args.machine_note),
    }
    settings["description"] = (
        f"tf_efficientnet_lite0 fine-tuned from the packaged ImageNet weights at {args.input_size} px, "
        f"{args.epochs} epochs per training (the last one kept), retrained from those weights every round; loss "
        f"prediction on (detached). Pool: {args.pool_size or 'all'} training images per task; val: "
        f"{args.val_size or 'all'} images (it chooses the threshold the band is centred on). Start: "
        f"{args.start:.0%} of the pool at random; each round adds {args.step:.0%} of the pool. Test AP on the "
        f"whole test split; seeds {args.seeds}. Machine: {settings['machine']}."
    )
    results: dict = {}

    def save() -> None:
        (out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))

    began = time.perf_counter()
    for task_name in args.tasks:
        for seed in args.seeds:
            simulate(task_name, args, seed, results, save)
    settings["wall_minutes"] = (time.perf_counter() - began) / 60
    save()
    write_report(out, results, settings)
    return 0


def write_report(out: Path, results: dict, settings: dict) -> None:
    lines = report(results, settings)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "active_learning.png")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
