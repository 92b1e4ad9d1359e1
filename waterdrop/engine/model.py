"""mmengine wrapper around MultiTaskNet: the training recipe of every task (losses, cutmix,
the per-task features' terms) and predictions for the validation metric."""

from __future__ import annotations

import math

import torch
from mmengine.model import BaseModel

from waterdrop.config import RegistryConfig
from waterdrop.data.dataset import task_entries
from waterdrop.engine.distributed import all_ranks_agree
from waterdrop.engine.loss_weighting import TaskLossWeighting, last_shared_weight
from waterdrop.features.base import LossBatch, build_features, rename_old_keys
from waterdrop.model.lineage import task_modules
from waterdrop.model.multitask import MultiTaskNet


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_sample * mask).sum() / mask.sum().clamp(min=1)


def _paste(images: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, box: tuple[int, int, int, int],
           scale: float) -> None:
    """Cutmix in place: ``rows`` get the rectangle ``box`` (top, left, height, width, in the
    student's pixels; times ``scale`` for another resolution) of ``rows[order]``."""
    top, left, cut_h, cut_w = (round(value * scale) for value in box)
    images[rows, :, top:top + cut_h, left:left + cut_w] = images[rows[order], :, top:top + cut_h, left:left + cut_w]


def _views(extras: dict, images: torch.Tensor) -> list[str]:
    """The extras that are other views of the batch's images (e.g. at a teacher's resolution)."""
    return [key for key, value in extras.items()
            if isinstance(value, torch.Tensor) and value.dim() == 4 and len(value) == len(images)]


class WaterdropModel(BaseModel):
    """Losses come back as ``{"<task>.<term>": value}`` (already times the task's loss
    weight) so logs and TensorBoard show every term. Per task: its head's terms, on the
    cutmix of the task's batch where its YAML sets ``augment.cutmix`` (a rectangle of another
    same-task image is pasted in; the loss mixes both targets by area), plus the terms of its
    features (``waterdrop.features``): those of the network (``net.features``: a cascade's
    second network, detector assist, loss prediction) and those of training alone
    (``features``: mean teacher, distillation). A feature may deploy another network than
    the student (mean teacher's EMA copy): ``deployed``.

    The task terms are then weighted by ``train.loss_weighting`` (``waterdrop.engine.loss_weighting``):
    fixed, uncertainty (learned log-variances) or GradNorm; the weights are logged as
    ``<task>.weight``.

    A batch whose loss is NaN or infinite is skipped (no optimizer step, and the buffers
    its forward pass touched, BatchNorm statistics included, are restored) and counted in
    ``nonfinite_batches``; ``max_nonfinite_streak`` such batches in a row stop training
    with an error naming the terms.
    """

    def __init__(self, cfg: RegistryConfig, max_nonfinite_streak: int = 20):
        super().__init__()
        self.net = MultiTaskNet(cfg)
        self.tasks = {t.name: t for t in cfg.tasks}
        self.max_nonfinite_streak = max_nonfinite_streak
        self.nonfinite_batches = 0
        self._nonfinite_streak = 0
        self.epoch_progress = 0.0  # epochs done, fractional; set by WaterdropHook before each iteration
        self.features = build_features(cfg, self.net, part_of_network=False)
        self.register_load_state_dict_pre_hook(self._rename_old_keys)
        self.weighting = TaskLossWeighting(cfg.train.loss_weighting, cfg.task_names)
        self.amp_loss_scale = 1.0  # set by train_step under AMP, for GradNorm's gradient norms
        self.trained_tasks: list[str] | None = None  # None: every task and the shared trunk learn

    def train_only(self, tasks: list[str]) -> None:
        """From now on only ``tasks``' own parameters learn (``waterdrop.model.lineage``): the
        shared trunk and every other task are frozen, their BatchNorm statistics included."""
        self.trained_tasks = list(tasks)
        self.set_trainable(trunk=True)
        self.train(self.training)

    def set_trainable(self, trunk: bool = True) -> None:
        """Which of the student's parameters get gradients: with ``trunk`` False none of the
        shared backbones' (their task BatchNorm copies included); never a frozen one."""
        backbone = {id(p) for b in self.net.backbones() for p in b.parameters()}
        allowed = None
        if self.trained_tasks is not None:
            allowed = {id(p) for name in self.trained_tasks for module in task_modules(self.net, name)
                       for p in module.parameters()}
        for param in self.net.parameters():
            param.requires_grad_((trunk or id(param) not in backbone) and (allowed is None or id(param) in allowed))

    def train(self, mode: bool = True):
        """``requires_grad`` alone does not stop BatchNorm statistics from moving in training
        mode: with ``train_only`` every module but the trained tasks' own stays in eval mode
        (in the student and in a deployed copy such as a mean teacher's)."""
        super().train(mode)
        if mode and self.trained_tasks is not None:
            for net in {id(n): n for n in (self.net, self.deployed)}.values():
                net.eval()
                for name in self.trained_tasks:
                    for module in task_modules(net, name):
                        module.train()
        return self

    def _rename_old_keys(self, module, state, prefix, *_) -> None:
        rename_old_keys(self.features, state, prefix)

    @property
    def all_features(self) -> list:
        return [*self.net.features.values(), *self.features.values()]

    @property
    def deployed(self) -> MultiTaskNet:
        """The network that is validated, evaluated and exported."""
        return next((net for net in (f.deployed() for f in self.features.values()) if net is not None), self.net)

    def deployed_prefix(self) -> str:
        """Where ``deployed`` lives in this module's ``state_dict``, e.g. ``net.``."""
        return next(f"{name}." for name, module in self.named_modules() if module is self.deployed)

    def data_needs(self, needs: dict) -> None:
        """Fill ``needs`` (task name -> ``DataNeeds``) with what every feature asks of the loader."""
        for name, task_needs in needs.items():
            for feature in self.all_features:
                feature.data_needs(name, task_needs)

    def forward(self, inputs, task_index, targets=None, mode="tensor", **extras):
        if mode == "loss":
            return self._losses(inputs, task_index, targets, extras)
        if not len(inputs):  # an evaluation batch whose images were all undecodable
            return [] if mode == "predict" else {}
        outputs = self.deployed.forward_tasks(inputs, task_index)
        if mode == "predict":
            return [{"task": name, "score": s, "truth": t}
                    for name, (scores, truth) in self.deployed.scores_and_truth(outputs, targets).items()
                    for s, t in zip(scores, truth)]
        return outputs

    def _losses(self, images, task_index, targets, extras) -> dict[str, torch.Tensor]:
        images, mixes, extras = self._cutmix(images, task_index, targets, extras)
        outputs = self.net.forward_tasks(images, task_index, complete=False)
        labeled = {name: extras.get("labeled", {}).get(name, torch.ones(len(target), dtype=torch.bool))
                   .to(target.device) for name, target in targets.items()}
        losses, supervised, sample_losses = {}, {}, {}
        for t, name in enumerate(self.net.task_names):
            if name not in outputs:
                continue
            task, target, mask = self.tasks[name], targets[name], labeled[name]
            terms = self.net.task_terms(name, outputs[name], target, mixes.get(name), task_entries(extras, name))
            for term, per_sample in terms.items():
                losses[f"{name}.{term}"] = _masked_mean(per_sample, mask) * task.loss_weight
            if mask.any():  # GradNorm's training rate: the task's own terms on labeled samples
                supervised[t] = sum(losses[f"{name}.{term}"] for term in terms)
            sample_losses[name] = sum(terms.values()).detach()  # what features rank samples by
        batch = LossBatch(net=self.net, images=images, task_index=task_index, targets=targets, labeled=labeled,
                          outputs=outputs, sample_losses=sample_losses, mixes=mixes,
                          epoch_progress=self.epoch_progress, extras=extras)
        for feature in self.all_features:
            losses.update(feature.loss_terms(batch))
        if self.weighting.method == "gradnorm" and self.training:
            self.weighting.gradnorm_step(supervised, last_shared_weight(self.net.trunk), self.amp_loss_scale)
        # Weighted inside the forward pass, so that under DDP the learned log-variances are part
        # of the graph it synchronises.
        return self.weighting.weigh(losses)

    def parse_losses(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """mmengine's sum of every logged value whose key contains "loss", except that a value
        counts by its term's name alone: a task named e.g. ``gloss`` must not turn its logged
        ``gloss.weight`` into a loss."""
        log_vars = {key: value.mean() for key, value in losses.items()}
        loss = sum(value for key, value in log_vars.items() if "loss" in key.split(".", 1)[-1])
        return loss, {"loss": loss, **log_vars}

    def _cutmix(self, images, task_index, targets, extras):
        """Paste a random rectangle of another image of the same task (Yun et al., 2019); the
        batch's other views of its images (another resolution) get the same rectangle, scaled."""
        mixes, copied = {}, False
        height, width = images.shape[-2:]
        for t, name in enumerate(self.net.task_names):
            prob = self.tasks[name].augment.cutmix
            rows = (task_index == t).nonzero(as_tuple=True)[0]
            if not prob or len(rows) < 2 or float(torch.rand(())) >= prob:
                continue
            order = torch.randperm(len(rows), device=rows.device)
            side = math.sqrt(1 - float(torch.rand(())))  # area fraction ~ Beta(1, 1)
            cut_h, cut_w = int(height * side), int(width * side)
            top = int(torch.randint(0, height - cut_h + 1, ()))
            left = int(torch.randint(0, width - cut_w + 1, ()))
            if not copied:
                views = _views(extras, images)
                images, copied = images.clone(), True
                extras = {**extras, **{key: extras[key].clone() for key in views}}
            _paste(images, rows, order, (top, left, cut_h, cut_w), 1.0)
            for key in views:
                _paste(extras[key], rows, order, (top, left, cut_h, cut_w), extras[key].shape[-1] / width)
            mixes[name] = (targets[name][order], 1 - cut_h * cut_w / (height * width))
        return images, mixes, extras

    def train_step(self, data, optim_wrapper, run_forward=None):
        """One optimisation step. ``run_forward`` is the DDP wrapper's forward under DDP (so
        gradients synchronise); a batch is skipped on every rank when its loss is not finite
        on any rank, so no rank waits for another's gradients."""
        # BN statistics are updated by the forward pass itself; a NaN batch would poison them.
        buffers = list(self.buffers())
        saved = [b.detach().clone() for b in buffers]
        scaler = getattr(optim_wrapper, "loss_scaler", None)
        self.amp_loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        with optim_wrapper.optim_context(self):
            data = self.data_preprocessor(data, True)
            losses = (run_forward or self._run_forward)(data, mode="loss")
        loss, log_vars = self.parse_losses(losses)
        if all_ranks_agree(bool(torch.isfinite(loss))):
            self._nonfinite_streak = 0
            optim_wrapper.update_params(loss)
            for feature in self.all_features:
                feature.after_step(self.net)
            return log_vars
        self.nonfinite_batches += 1
        self._nonfinite_streak += 1
        bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
        if self._nonfinite_streak >= self.max_nonfinite_streak:
            raise FloatingPointError(
                f"loss was NaN or infinite for {self._nonfinite_streak} batches in a row (terms: {', '.join(bad)}); "
                "lower train.optimizer.lr, check the task's data, or turn amp off")
        optim_wrapper.zero_grad()
        with torch.no_grad():
            for buffer, copy_ in zip(buffers, saved):
                buffer.copy_(copy_)
        return {"nonfinite_skipped": torch.tensor(1.0)}
