"""Assemble data, model and mmengine's Runner from a registry, and train."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import subprocess
from functools import partial
from pathlib import Path

import torch
from mmengine.dist import barrier, get_dist_info, is_distributed
from mmengine.evaluator import Evaluator
from mmengine.logging import MMLogger
from mmengine.runner import Runner
from torch.utils.data import DataLoader

from waterdrop import __version__, allocator
from waterdrop.config import RegistryConfig, blamed_on, config_to_dict, load_registry
from waterdrop.data.dataset import collate
from waterdrop.data.loaders import build_datasets, eval_loader, network_needs, task_streams
from waterdrop.data.sampler import MultiTaskBatchSampler, task_sampling_probabilities
from waterdrop.engine.checkpoint import (
    RunFolderError,
    allow_mmengine_checkpoints,
    best_checkpoint,
    check_resumable,
    check_run_folder,
    last_checkpoint,
    load_checkpoint,
    load_net,
)
from waterdrop.engine.distributed import finish_distributed, init_distributed, wrapper_config
from waterdrop.engine.hooks import WaterdropHook
from waterdrop.engine.lifecycle import PlanError, TaskPlan, describe, plan_training
from waterdrop.engine.metric import TaskMetric
from waterdrop.engine.model import WaterdropModel
from waterdrop.engine.optim import TrunkLrConstructor  # noqa: F401  (registers the optimizer constructor)
from waterdrop.engine.schedule import param_schedulers
from waterdrop.engine.timing import PhaseClock
from waterdrop.evaluation.evaluate import evaluate, format_report
from waterdrop.model.lineage import inherit, model_hash, output_differences, task_hashes
from waterdrop.model.multitask import MultiTaskNet

_RUNS_IN_PROCESS = itertools.count()


def _log_details_to_file_only(logger: MMLogger) -> None:
    """mmengine logs ~180 lines of environment and config per run. The Runner is built at
    WARNING level to keep them off the console; from then on the log file gets INFO."""
    logger.setLevel(logging.INFO)
    for handler in logger.handlers:
        handler.setLevel(logging.INFO if isinstance(handler, logging.FileHandler) else logging.WARNING)


def build_runner(cfg: RegistryConfig, work_dir: str | Path, epochs: int | None = None, resume: bool = False,
                 launcher: str = "none", printer=print, plan: TaskPlan | None = None,
                 parent: MultiTaskNet | None = None) -> Runner:
    """The Runner of one training run. With ``plan`` only its trained tasks learn and are
    sampled; the rest of the network starts as ``parent`` (unless resumed) and stays frozen."""
    work_dir = Path(work_dir)
    allow_mmengine_checkpoints()
    init_distributed(launcher)
    rank, world_size = get_dist_info()
    train = cfg.train
    epochs = epochs or train.epochs
    torch.manual_seed(train.seed)
    model = WaterdropModel(cfg)
    if plan is not None:  # before the run folder is touched: a parent that does not fit writes nothing
        if not resume:
            try:
                origin = inherit(model.net, parent.state_dict(), parent.task_names, set(plan.trained), set(plan.fresh))
            except ValueError as err:
                raise PlanError(f"--from {plan.parent}: {err}") from err
            if model.deployed is not model.net:  # a mean teacher starts as the deployed parent too
                model.deployed.load_state_dict(model.net.state_dict())
            if rank == 0:
                printer("\n".join(f"  {name}: {source}" for name, source in origin.items() if name in plan.trained))
        model.train_only(plan.trained)
    # A checkpoint holds the weights and two AdamW moments per parameter.
    check_run_folder(work_dir, resume, 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    if resume:
        check_resumable(work_dir, cfg)
    needs = network_needs(cfg, model.net)
    model.data_needs(needs)
    train_set = build_datasets(cfg, model.net, "train", needs)
    if any(task.test is not None for task in cfg.tasks):
        build_datasets(cfg, model.net, "test")  # a bad test split fails now, not after training
    for task, dataset in zip(cfg.tasks, train_set.datasets):
        if dataset.boxes_left_out and rank == 0:
            printer(f"warning: {task.name}: {needs[task.name].boxes.left_out(dataset.boxes_left_out)}")
    # Unlabeled images (a feature asked for them) neither weigh in the task sampling nor lengthen the epoch.
    labeled = [dataset.labeled_count if plan is None or task.name in plan.trained else 0
               for task, dataset in zip(cfg.tasks, train_set.datasets)]
    weights = task_sampling_probabilities(train.sampling_policy, labeled, cfg.task_names, train.sampling_weights)
    if plan is not None:  # frozen tasks get no batch slots (plan_training checked that some task has one)
        weights = weights * [name in plan.trained for name in cfg.task_names]
        weights = weights / weights.sum()
    batch_sampler = MultiTaskBatchSampler(train_set.sizes, train.batch_size, weights, train.seed,
                                          task_streams(cfg, train_set, needs), rank, world_size, labeled)
    # Own generator, re-seeded every epoch by WaterdropHook; non-persistent workers so that
    # they are re-seeded too (see "Resume" in the README).
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, num_workers=train.num_workers,
                              collate_fn=partial(collate, task_names=cfg.task_names), generator=torch.Generator())
    amp = train.amp == "on" or (train.amp == "auto" and torch.cuda.is_available())
    optimizer = {"type": train.optimizer, "lr": train.lr, "weight_decay": train.weight_decay}
    if train.optimizer == "SGD":
        optimizer["momentum"] = train.momentum
    with blamed_on(cfg.file, "train.warmup_epochs"):
        schedulers = param_schedulers(train.schedule, epochs, train.warmup_epochs, len(batch_sampler),
                                      cycle_momentum=train.optimizer == "AdamW")
    hook = WaterdropHook(config_to_dict(cfg), train.log_interval, printer, train.freeze_trunk_epochs, train.seed,
                         plan.to_dict() if plan else None)
    kinds = {name: head.kind for name, head in model.net.heads.items()}
    runner = Runner(
        model=model,
        work_dir=str(work_dir),
        train_dataloader=train_loader,
        val_dataloader=eval_loader(cfg, model.net, "val", world_size > 1),
        val_evaluator=Evaluator(TaskMetric(kinds)),
        train_cfg={"by_epoch": True, "max_epochs": epochs, "val_interval": 1},
        val_cfg={},
        optim_wrapper={"type": "AmpOptimWrapper" if amp else "OptimWrapper", "optimizer": optimizer,
                       "clip_grad": {"max_norm": 10.0},
                       "constructor": "TrunkLrConstructor", "paramwise_cfg": {"trunk_lr_mult": train.trunk_lr_mult,
                                                                        "loss_weight_lr": train.loss_weighting.lr}},
        param_scheduler=schedulers,
        default_hooks={
            # Without a best_*.pth, best_checkpoint() and every tool reading a run folder take the last one.
            "checkpoint": {"type": "CheckpointHook", "interval": 1, "rule": "greater",
                           "save_best": "val/score" if train.checkpoint == "best" else None,
                           "max_keep_ckpts": 2},
            "logger": {"type": "LoggerHook", "interval": train.log_interval},
        },
        custom_hooks=[hook],
        visualizer={"type": "Visualizer", "vis_backends": [{"type": "LocalVisBackend"},
                                                           {"type": "TensorboardVisBackend"}]},
        launcher=launcher,
        cfg={"model_wrapper_cfg": wrapper_config()},
        randomness={"seed": train.seed},
        resume=resume,
        log_level="WARNING",
        # mmengine names the logger, message hub and visualizer by the second the run began: two runs
        # built within one second (tuning trials) would share them, and write into each other's logs.
        experiment_name=f"waterdrop-{next(_RUNS_IN_PROCESS)}",
    )
    _log_details_to_file_only(runner.logger)
    return runner


def code_commit() -> str | None:
    """The git commit of this code, None outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except OSError:
        return None


def _record_run(cfg: RegistryConfig, work_dir: Path) -> None:
    """Copy the registry and task files and note the code version, so a run can be
    understood later."""
    config_dir = work_dir / "config"
    (config_dir / "tasks").mkdir(parents=True, exist_ok=True)
    shutil.copy(cfg.file, config_dir / cfg.file.name)
    for task in cfg.tasks:
        shutil.copy(task.file, config_dir / "tasks" / task.file.name)
    # Everything resolved (labels, relations, preprocessing): what the checkpoints hold too.
    (config_dir / "resolved.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    run = {"waterdrop_version": __version__, "git_commit": code_commit(), "registry": str(cfg.file),
           "torch": torch.__version__, "cuda": torch.cuda.is_available(), "malloc": allocator.state()}
    (work_dir / "run.json").write_text(json.dumps(run, indent=2))


LINEAGE_IMAGES = 128  # validation images on which carried tasks' outputs are compared with the parent's


def recorded_plan(work_dir: Path) -> TaskPlan | None:
    """The plan of the run in ``work_dir`` (to resume it as it started), None for a run from scratch."""
    last = last_checkpoint(work_dir)
    recorded = load_checkpoint(last).get("meta", {}).get("waterdrop", {}).get("lineage") if last else None
    return TaskPlan.from_dict(recorded) if recorded else None


def record_lineage(cfg: RegistryConfig, net: MultiTaskNet, work_dir: Path, plan: TaskPlan | None,
                   printer=print, parent: MultiTaskNet | None = None) -> dict:
    """Write ``lineage.json``: every task's content hash and, for a run trained from a parent,
    its status, whether it changed, and for every task not trained the largest difference of its
    outputs from the parent's on validation images (0.0: bit for bit); ``parent`` is the
    parent's network where it is at hand (else read from ``plan.parent``). Returns the record."""
    hashes = task_hashes(net, cfg)
    record = {"model_hash": model_hash(hashes), "parent": None,
              "tasks": {name: {"hash": digest} for name, digest in hashes.items()}}
    if plan is not None:
        parent = (parent or load_net(plan.parent)[0]).cpu()
        net = net.cpu()  # evaluation may have left it on a GPU; the comparison is made on the CPU
        images = []
        for batch in eval_loader(cfg, net, "val"):
            images.append(batch["inputs"])
            if sum(map(len, images)) >= LINEAGE_IMAGES:
                break
        images = torch.cat(images)[:LINEAGE_IMAGES]
        differences = output_differences(parent, net, images, plan.carried)
        record["parent"] = {"checkpoint": plan.parent, "model_hash": model_hash(plan.parent_hashes)}
        record["retired"] = plan.retired
        printer(f"lineage (parent {plan.parent}):")
        changed = plan.changed(hashes)
        for name, entry in record["tasks"].items():
            entry["status"] = plan.status(name)
            entry["changed"] = name in changed
            if name in differences:
                entry["largest_output_difference"] = differences[name]
                entry["compared_on_images"] = len(images)
            note = (f", largest output difference {differences[name]:.3g} on {len(images)} val images"
                    if name in differences else "")
            printer(f"  {name}: {entry['status']}, {'CHANGED' if entry['changed'] else 'unchanged'} "
                    f"(hash {entry['hash'][:12]}){note}")
        for name in plan.retired:
            printer(f"  {name}: retired")
    (work_dir / "lineage.json").write_text(json.dumps(record, indent=2))
    return record


def run_training(registry: str | Path, work_dir: str | Path, epochs: int | None = None, resume: bool = False,
                 launcher: str = "none", printer=print, parent: str | Path | None = None,
                 tasks: list[str] | None = None, retire: list[str] = (), started: float | None = None) -> dict | None:
    """Train the tasks of ``registry``, then evaluate the kept checkpoint (``train.checkpoint``) into
    ``work_dir/eval`` and write ``lineage.json``. Returns the evaluation report (None on ranks
    other than 0).

    Without ``parent`` every task trains jointly. With ``parent`` (the run of the model in
    production) only ``tasks`` train, and the tasks the registry adds (see
    ``waterdrop.engine.lifecycle``); ``retire`` names the parent's tasks left out on purpose.
    A resumed run keeps the plan it started with. ``timing.json`` splits the wall time since
    ``started`` (default: now) into start-up, training, validation, checkpoints and the final
    evaluation.
    """
    clock = PhaseClock(started)
    cfg = load_registry(registry)
    work_dir = Path(work_dir)
    plan, parent_net = None, None
    if parent is not None:
        plan, parent_net = plan_training(cfg, parent, tasks, list(retire))
    elif tasks or retire:
        raise PlanError("--tasks and --retire choose tasks of a trained model: give it with --from RUN")
    if resume and last_checkpoint(work_dir) is not None:  # else build_runner says there is nothing to resume
        recorded = recorded_plan(work_dir)
        if plan is not None and (recorded is None or recorded.trained != plan.trained
                                 or recorded.parent != plan.parent):
            raise RunFolderError(f"{work_dir}: this run was started with another parent or other tasks; resume it "
                                 "with the same --from and --tasks, or without them")
        plan = recorded
    init_distributed(launcher)
    rank, _ = get_dist_info()
    if is_distributed():  # what rank 0 prepared before the call (tools/train.py: the demo data) is there for all
        barrier()
    if plan is not None and rank == 0:
        printer(describe(plan))
    runner = build_runner(cfg, work_dir, epochs, resume, launcher, printer, plan, parent_net)
    for hook in clock.hooks():
        runner.register_hook(hook)
    if rank == 0 and not resume:  # a resumed run keeps the record of the run it continues
        _record_run(cfg, work_dir)
    runner.train()
    finish_distributed()  # rank 0 evaluates alone, outside the group
    if rank != 0:
        return None
    clock.begin("final_evaluation")
    checkpoint = best_checkpoint(work_dir)
    net, cfg, _ = load_net(checkpoint)
    report = evaluate(net, cfg, work_dir / "eval", "cuda" if torch.cuda.is_available() else "cpu", checkpoint,
                      kept_thresholds=plan.parent_thresholds if plan else None)
    printer(f"evaluated {checkpoint.name}:\n{format_report(report)}")
    record_lineage(cfg, net, work_dir, plan, printer, parent_net)
    clock.end("final_evaluation")
    printer(clock.summary(clock.write(work_dir)))
    return report
