"""The run's own bookkeeping: readable progress, skipped images, results.csv, summary."""

from __future__ import annotations

import csv
import json
import random
import resource
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from mmengine.dist import all_gather_object, is_distributed, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from waterdrop import __version__, progress
from waterdrop.engine.optim import reorder_saved_optimizer_state
from waterdrop.evaluation.metrics import json_safe
from waterdrop.evaluation.plots import loss_weight_curves


def _memory() -> str:
    if torch.cuda.is_available():
        return f"gpu {torch.cuda.max_memory_allocated() / 2**30:.2f}G"
    return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}G"


class WaterdropHook(Hook):
    """Prints a progress line every ``log_interval`` iterations (epoch, each loss term,
    learning rate, images/s, memory), counts undecodable images per epoch, writes
    ``results.csv`` (one row per epoch), ``summary.json`` and, with learned task-loss
    weights, ``loss_weights.png`` (their mean per epoch), and records the resolved
    config (``config_to_dict``) in every checkpoint so eval and export rebuild the model
    from the checkpoint alone, with ``lineage``: the plan of a run trained from a parent
    (``waterdrop.engine.lifecycle.TaskPlan``), None for a run from scratch.

    With ``freeze_trunk_epochs`` N, the shared trunk's weights (and a fusion backbone's) get
    no gradients during the first N epochs (only heads and cascade networks learn, and each
    step is cheaper); their BatchNorm statistics still adapt. This is the usual first phase of transfer learning
    on small sets: random heads do not push large gradients into pretrained features.
    """

    priority = "NORMAL"

    def __init__(self, config: dict, log_interval: int, printer=print, freeze_trunk_epochs: int = 0, seed: int = 0,
                 lineage: dict | None = None):
        self.config, self.lineage = config, lineage
        self.task_names = [task["name"] for task in config["tasks"]]
        self.seed = seed
        self.log_interval, self._printer = log_interval, printer
        self.freeze_trunk_epochs = freeze_trunk_epochs
        self.skipped: dict[str, set[str]] = defaultdict(set)
        self.rows: list[dict] = []

    def print(self, *args, **kwargs) -> None:
        """Only rank 0 speaks; under DDP the others would repeat it."""
        if is_main_process():
            self._printer(*args, **kwargs)

    @staticmethod
    def _model(runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train(self, runner) -> None:
        # On resume, keep the rows of the epochs already done.
        results = Path(runner.work_dir) / "results.csv"
        if runner.epoch > 0 and results.is_file():
            with open(results, newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= runner.epoch]

    def before_train_epoch(self, runner) -> None:
        # Augmentation draws from (seed, epoch) alone, so a resumed epoch repeats exactly:
        # the loader's workers take their seeds from its own generator (non-persistent
        # workers are re-seeded every epoch), and without workers the main process's.
        epoch_seed = self.seed * 100_003 + runner.epoch
        random.seed(epoch_seed)
        np.random.seed(epoch_seed % 2**32)
        generator = getattr(runner.train_dataloader, "generator", None)
        if generator is not None:
            generator.manual_seed(epoch_seed)
        frozen = runner.epoch < self.freeze_trunk_epochs
        self._model(runner).set_trainable(trunk=not frozen)
        if frozen and runner.epoch == 0:
            self.print(f"trunk frozen for the first {self.freeze_trunk_epochs} epoch(s)", flush=True)
        self._epoch_paths: list[tuple[str, str]] = []
        self._sums, self._counts = defaultdict(float), defaultdict(int)
        self._start, self._images = time.perf_counter(), 0

    def _elapsed(self) -> float:
        """Seconds since this epoch's first batch."""
        return max(time.perf_counter() - self._start, 1e-9)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._model(runner).epoch_progress = runner.epoch + batch_idx / len(runner.train_dataloader)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._epoch_paths += [(task, path) for task, path in data_batch.get("skipped", [])]
        self._images += len(data_batch["inputs"])
        for key, value in (outputs or {}).items():
            self._sums[key] += float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self._counts[key] += 1
        iters = len(runner.train_dataloader)
        if ((batch_idx + 1) % self.log_interval == 0 or batch_idx + 1 == iters) and not progress.is_quiet():
            losses = "  ".join(f"{k} {self._sums[k] / self._counts[k]:.4f}" for k in sorted(self._sums))
            elapsed = self._elapsed()
            speed = self._images / elapsed
            lr = max(runner.optim_wrapper.get_lr()["lr"])  # the heads' rate; the trunk's may be lower
            # Training time left at this epoch's pace (validation not counted).
            iters_left = iters - batch_idx - 1 + (runner.max_epochs - runner.epoch - 1) * iters
            left = progress.clock(iters_left * elapsed / (batch_idx + 1))
            self.print(f"epoch {runner.epoch + 1}/{runner.max_epochs}  iter {batch_idx + 1}/{iters}  {losses}  "
                       f"lr {lr:.2e}  {speed:.1f} img/s  left ~{left}  {_memory()}", flush=True)

    def after_train_epoch(self, runner) -> None:
        # Under DDP each rank decoded its own share of the batches: sum the skips over ranks.
        ranks = all_gather_object(self._epoch_paths) if is_distributed() else [self._epoch_paths]
        epoch_skipped = sum(len(paths) for paths in ranks)
        for paths in ranks:
            for task, path in paths:
                self.skipped[task].add(path)
        row = {"epoch": runner.epoch + 1, "lr": max(runner.optim_wrapper.get_lr()["lr"]),
               "images_per_s": round(self._images / self._elapsed(), 2),
               "skipped_images": epoch_skipped, "nonfinite_batches": self._model(runner).nonfinite_batches}
        row.update({k: self._sums[k] / self._counts[k] for k in sorted(self._sums)})
        self.rows.append(row)
        if epoch_skipped:
            runner.logger.warning(f"epoch {runner.epoch + 1}: skipped {epoch_skipped} undecodable images")
            self.print(f"epoch {runner.epoch + 1}: skipped {epoch_skipped} undecodable images "
                       f"({sum(len(v) for v in self.skipped.values())} distinct so far)", flush=True)

    def after_val_epoch(self, runner, metrics=None) -> None:
        if metrics:
            self.print("  val  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if self.rows and metrics:
            self.rows[-1].update(metrics)
        self._write_results(Path(runner.work_dir))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["waterdrop"] = {"config": self.config, "version": __version__,
                                                          "deployed": self._model(runner).deployed_prefix(),
                                                          "lineage": self.lineage}
        # What a resumed run needs beyond mmengine's state: the model's random stream
        # (dropout, cutmix) and the run's counts.
        checkpoint["meta"]["waterdrop_resume"] = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "skipped": {task: sorted(paths) for task, paths in self.skipped.items()},
            "nonfinite_batches": self._model(runner).nonfinite_batches}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        reorder_saved_optimizer_state(self._model(runner), checkpoint)  # before the runner loads it
        state = checkpoint.get("meta", {}).get("waterdrop_resume")
        if not state:
            return
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.skipped = defaultdict(set, {task: set(paths) for task, paths in state["skipped"].items()})
        self._model(runner).nonfinite_batches = state["nonfinite_batches"]

    def after_train(self, runner) -> None:
        if not is_main_process():
            return
        self._write_results(Path(runner.work_dir))
        summary = {
            "epochs": runner.epoch,
            "nonfinite_batches_skipped": self._model(runner).nonfinite_batches,
            "skipped_images": {task: sorted(paths) for task, paths in self.skipped.items()},
            "skipped_image_count": sum(len(p) for p in self.skipped.values()),
            "boxes_beyond_max_boxes": {name: dataset.boxes_left_out for name, dataset in
                                       zip(self.task_names, runner.train_dataloader.dataset.datasets)},
            "last_epoch": self.rows[-1] if self.rows else {},
        }
        (Path(runner.work_dir) / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))

    def _write_results(self, work_dir: Path) -> None:
        if not self.rows or not is_main_process():
            return
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        with open(work_dir / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(self.rows)
        # Every epoch, so that an interrupted run has its plot too.
        if any(f"{name}.weight" in row for row in self.rows for name in self.task_names):
            loss_weight_curves(work_dir / "loss_weights.png", self.rows, self.task_names)
