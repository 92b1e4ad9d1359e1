"""mmengine wrapper around MultiTaskNet: the training recipe of every task (losses, cutmix,
OHEM cascade, mean teacher) and predictions for the validation metric."""

from __future__ import annotations

import copy
import math

import torch
from mmengine.model import BaseModel

from waterdrop.config import ConfigError, RegistryConfig
from waterdrop.engine.distillation import Distiller
from waterdrop.engine.distributed import all_ranks_agree
from waterdrop.engine.loss_weighting import TaskLossWeighting, last_shared_weight
from waterdrop.model.head import Head
from waterdrop.model.loss_prediction import ranking_loss
from waterdrop.model.multitask import MultiTaskNet


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_sample * mask).sum() / mask.sum().clamp(min=1)


def _task_terms(head: Head, outputs: dict, target: torch.Tensor, mix) -> dict[str, torch.Tensor]:
    """Per-sample loss terms; under cutmix ``mix = (second_target, lam)`` weighs both targets."""
    terms = head.loss(outputs, target)
    # mmengine optimises only the logged values whose key contains "loss"; anything else
    # would be shown in the logs and silently not trained.
    untrained = [term for term in terms if "loss" not in term]
    if untrained:
        raise ValueError(f"{type(head).__name__}.loss returned terms {untrained}; every term name must contain "
                         "'loss' (e.g. 'loss_cls'), or it is logged but never optimised")
    if mix is None:
        return terms
    second_target, lam = mix
    second = head.loss(outputs, second_target)
    return {k: lam * v + (1 - lam) * second[k] for k, v in terms.items()}


def _paste(images: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, box: tuple[int, int, int, int],
           scale: float) -> None:
    """Cutmix in place: ``rows`` get the rectangle ``box`` (top, left, height, width, in the
    student's pixels; times ``scale`` for another resolution) of ``rows[order]``."""
    top, left, cut_h, cut_w = (round(value * scale) for value in box)
    images[rows, :, top:top + cut_h, left:left + cut_w] = images[rows[order], :, top:top + cut_h, left:left + cut_w]


def rampup(progress_epochs: float, rampup_epochs: float) -> float:
    """Sigmoid-shaped ramp from ~0 to 1 over ``rampup_epochs`` (Laine & Aila, 2017)."""
    if rampup_epochs <= 0:
        return 1.0
    t = min(max(progress_epochs / rampup_epochs, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class WaterdropModel(BaseModel):
    """Losses come back as ``{"<task>.<term>": value}`` (already times the task's loss
    weight) so logs and TensorBoard show every term. Per task, as its YAML says:

    * cutmix: a rectangle of another same-task image is pasted in; the loss mixes both
      targets by area.
    * cascade: the second network is trained on the ``hard_per_batch`` samples with the
      highest first-network loss in the batch (OHEM); term ``cascade_<term>``.
    * mean_teacher: an EMA copy of the whole network (``teacher``) sees a second view of
      the task's images, labeled and unlabeled; ``loss_consistency`` is the MSE between
      student and teacher probabilities, ramped up. Unlabeled samples are left out of the
      supervised terms. Validation, eval and export use the teacher.
    * loss_prediction: the task's loss prediction module learns to rank the task's labeled
      samples of the batch by the head's per-sample loss (the sum of its terms, mixed under
      cutmix, detached), with the pairwise ranking loss over random pairs; term
      ``loss_lossprediction``, times its ``loss_weight``. Skipped with fewer than two
      labeled samples of the task in the batch.
    * distillation (registry ``train.distillation``): a teacher run of the same tasks adds
      ``<task>.loss_distill`` (``waterdrop.engine.distillation``); the teacher is not part of
      this module, so it is never saved or exported.

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
        for task in cfg.tasks:
            if task.augment.cutmix and self.net.heads[task.name].uses_boxes:
                raise ConfigError(task.file, "augment.cutmix", "cutmix cannot be used with a detector (the pasted "
                                  "rectangle would carry boxes the targets do not list); set it to 0")
        self.max_nonfinite_streak = max_nonfinite_streak
        self.nonfinite_batches = 0
        self._nonfinite_streak = 0
        self.epoch_progress = 0.0  # epochs done, fractional; set by WaterdropHook before each iteration
        teaching = [t.mean_teacher for t in cfg.tasks if t.mean_teacher]
        self.teacher = None
        if teaching:
            self.teacher = copy.deepcopy(self.net).requires_grad_(False)
            self.ema_decay = teaching[0].ema_decay
            self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.weighting = TaskLossWeighting(cfg.train.loss_weighting, cfg.task_names)
        self.distiller = Distiller(cfg.train.distillation, cfg, self.net) if cfg.train.distillation else None
        self.amp_loss_scale = 1.0  # set by train_step under AMP, for GradNorm's gradient norms

    @property
    def deployed(self) -> MultiTaskNet:
        """The network that is validated, evaluated and exported."""
        return self.teacher if self.teacher is not None else self.net

    def forward(self, inputs, task_index, targets=None, mode="tensor", labeled=None, inputs2=None,
                teacher_inputs=None, **unused):
        if mode == "loss":
            return self._losses(inputs, task_index, targets, labeled or {}, inputs2, teacher_inputs)
        if not len(inputs):  # an evaluation batch whose images were all undecodable
            return [] if mode == "predict" else {}
        outputs = self.deployed.forward_tasks(inputs, task_index)
        if mode == "predict":
            return [{"task": name, "score": s, "truth": t}
                    for name, (scores, truth) in self.deployed.scores_and_truth(outputs, targets).items()
                    for s, t in zip(scores, truth)]
        return outputs

    def _losses(self, images, task_index, targets, labeled, images2, teacher_images=None) -> dict[str, torch.Tensor]:
        images, mixes, teacher_images = self._cutmix(images, task_index, targets, teacher_images)
        outputs = self.net.forward_tasks(images, task_index, with_cascade=False)
        losses, supervised = {}, {}
        for t, name in enumerate(self.net.task_names):
            if name not in outputs:
                continue
            task, head, target = self.tasks[name], self.net.heads[name], targets[name]
            mask = labeled.get(name, torch.ones(len(target), dtype=torch.bool, device=target.device))
            mask = mask.to(target.device)
            terms = _task_terms(head, outputs[name], target, mixes.get(name))
            for term, per_sample in terms.items():
                losses[f"{name}.{term}"] = _masked_mean(per_sample, mask) * task.loss_weight
            if mask.any():  # GradNorm's training rate: the head's own terms on labeled samples
                supervised[t] = sum(losses[f"{name}.{term}"] for term in terms)
            sample_loss = sum(terms.values()).detach()  # what OHEM and loss prediction rank by
            if task.loss_prediction is not None and int(mask.sum()) >= 2:
                losses[f"{name}.loss_lossprediction"] = self._loss_prediction_loss(
                    task, outputs[name]["predicted_loss"][mask], sample_loss[mask])
            if task.cascade is not None and mask.any():
                rows = (task_index == t).nonzero(as_tuple=True)[0]
                hardness = sample_loss.masked_fill(~mask, -math.inf)
                hard = hardness.topk(min(task.cascade.hard_per_batch, int(mask.sum()))).indices
                mix = mixes.get(name)
                second = _task_terms(self.net.cascades[name].head, self.net.run_cascade(name, images[rows[hard]]),
                                     target[hard], None if mix is None else (mix[0][hard], mix[1]))
                weight = task.loss_weight * task.cascade.loss_weight
                for term, per_sample in second.items():
                    losses[f"{name}.cascade_{term}"] = per_sample.mean() * weight
        if self.teacher is not None:
            losses.update(self._consistency(outputs, images if images2 is None else images2, task_index))
        if self.distiller is not None:
            losses.update(self.distiller.losses(images, task_index, self.net, outputs,
                                                {name: task.loss_weight for name, task in self.tasks.items()},
                                                teacher_images))
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

    @staticmethod
    def _loss_prediction_loss(task, predicted: torch.Tensor, true_loss: torch.Tensor) -> torch.Tensor:
        # The batch's order follows the task's sampler, which may group samples (a balanced
        # sampler puts normal images first); random pairs avoid pairing by group.
        # ``true_loss`` is detached: the head must not learn to make its loss easy to predict.
        order = torch.randperm(len(predicted), device=predicted.device)
        spec = task.loss_prediction
        return ranking_loss(predicted[order], true_loss[order], spec.margin) * spec.loss_weight * task.loss_weight

    def _cutmix(self, images, task_index, targets, teacher_images=None):
        """Paste a random rectangle of another image of the same task (Yun et al., 2019); the
        distillation teacher's views (another resolution) get the same rectangle, scaled."""
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
                images, copied = images.clone(), True
                teacher_images = None if teacher_images is None else teacher_images.clone()
            _paste(images, rows, order, (top, left, cut_h, cut_w), 1.0)
            if teacher_images is not None:
                _paste(teacher_images, rows, order, (top, left, cut_h, cut_w), teacher_images.shape[-1] / width)
            mixes[name] = (targets[name][order], 1 - cut_h * cut_w / (height * width))
        return images, mixes, teacher_images

    def _consistency(self, student_outputs, views, task_index) -> dict[str, torch.Tensor]:
        taught = [t for t, name in enumerate(self.net.task_names)
                  if self.tasks[name].mean_teacher is not None and name in student_outputs]
        if not taught:
            return {}
        rows = torch.isin(task_index, torch.tensor(taught, device=task_index.device))
        with torch.no_grad():
            teacher_outputs = self.teacher.forward_tasks(views[rows], task_index[rows], with_cascade=False)
        losses = {}
        for t in taught:
            name = self.net.task_names[t]
            student = self.net.task_predictions(name, student_outputs[name])
            teacher = self.teacher.task_predictions(name, teacher_outputs[name])
            mse = torch.stack([(student[k].float() - teacher[k].float()).pow(2).mean() for k in student]).mean()
            settings = self.tasks[name].mean_teacher
            weight = settings.consistency_weight * rampup(self.epoch_progress, settings.rampup_epochs)
            losses[f"{name}.loss_consistency"] = mse * weight * self.tasks[name].loss_weight
        return losses

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA of the student's weights; BatchNorm statistics are copied. The decay starts
        low so the teacher does not average in the random initialisation for long."""
        self.ema_steps += 1
        steps = int(self.ema_steps)
        decay = min(self.ema_decay, (1 + steps) / (10 + steps))
        for teacher, student in zip(self.teacher.parameters(), self.net.parameters()):
            teacher.lerp_(student.detach(), 1 - decay)
        for teacher, student in zip(self.teacher.buffers(), self.net.buffers()):
            teacher.copy_(student)

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
            if self.teacher is not None:
                self.update_teacher()
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
