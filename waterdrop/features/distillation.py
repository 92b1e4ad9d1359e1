"""Knowledge distillation: a trained teacher run of the same tasks teaches the deployed student.

Per task, a divergence between the teacher's and the student's probabilities is added to
the student's loss: every probability the head reports is a yes/no (Bernoulli) distribution
(P(positive) and each sub-class probability of a binary head, each tag of a multi-label
head, each P(grade > k) of a graded one). The divergence is the mean over the head's groups
(a binary head's decision and its sub-classes count alike) of each group's mean, so that
a task's term has the same scale whichever kind of head it has.

* ``js``: Jensen-Shannon divergence, symmetric and bounded by log 2, so a teacher that is
  confidently wrong on a sample cannot dominate the batch.
* ``kl``: KL(teacher || student), the classic form (Hinton et al., 2015).

Both soften the logits by the temperature T first and are multiplied by T^2, so the
gradients keep their size when T changes. The term is ``<task>.loss_distill``, times the
task's distillation weight and its ``loss_weight``; unlabeled samples are taught as well.

A teacher with a larger input size than the student sees each training sample's crop at
its own resolution (the data loader makes both views of the same augmentation, and cutmix
pastes the same rectangle in both); otherwise it sees the student's batch resized.

The teacher is held outside the module tree: it is never in the student's ``state_dict``, so
never in a checkpoint or an export.

Positive-congruent training (``positive_congruent: true``; Yan et al., "Positive-Congruent
Training", CVPR 2021, focal distillation): the teacher is the model in production and a
sample's term is weighted ``1 + congruent_weight`` where the teacher decides it right at its
own thresholds (those of the run's exported ``model.onnx`` where there is one, else of its
evaluation), ``1 + congruent_weight x`` the fraction of its tags it gets right for a
multi-label sample (before the relation graph), so the new model keeps the old one's right
answers (fewer negative flips) while it learns from the labels where the old one was wrong.

Settings: the registry's ``train.distillation`` (``waterdrop.config.schema.DistillationConfig``),
which names the teacher and, per task, the weight and temperature.
"""

from __future__ import annotations

import pickle

import numpy as np
import torch
import torch.nn.functional as F

from waterdrop.config import ConfigError, RegistryConfig, blamed_on
from waterdrop.features.base import LossBatch, TaskFeature, register_feature
from waterdrop.kinds import kind_of
from waterdrop.model.head import Head

_EPS = 1e-6


def soft_probabilities(head: Head, outputs: dict[str, torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
    """The head's reported probabilities, (N, M) each, from its logits divided by ``temperature``.
    These are the head's own, before a feature changes them (a detector's assist is not taught)."""
    if "logits" not in outputs:
        raise ValueError(f"{type(head).__name__} gives no 'logits' output; distillation softens the logits")
    predictions = head.predict(dict(outputs, logits=outputs["logits"] / temperature))
    return {key: value.float().reshape(len(value), -1) for key, value in predictions.items()
            if key in ("prob", "subclass_prob")}


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)), elementwise."""
    p, q = p.clamp(_EPS, 1 - _EPS), q.clamp(_EPS, 1 - _EPS)
    return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()


def divergence(teacher: torch.Tensor, student: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample mean divergence between (N, M) Bernoulli probabilities."""
    if kind == "kl":
        return bernoulli_kl(teacher, student).mean(dim=1)
    middle = (teacher + student) / 2
    return (bernoulli_kl(teacher, middle) + bernoulli_kl(student, middle)).mean(dim=1) / 2


@register_feature
class Distillation(TaskFeature):
    """The teacher network of a run and, per taught task, its weight and temperature.

    Raises:
        ConfigError: the teacher cannot be loaded, or lacks a taught task, or has it with
            other labels or another kind of head.
    """

    key = "distillation"
    part_of_network = False

    @classmethod
    def settings_of(cls, cfg: RegistryConfig) -> dict[str, tuple[float, float]]:
        spec = cfg.train.distillation
        if spec is None:
            return {}
        return {task.name: spec.settings(task.name) for task in cfg.tasks if spec.settings(task.name)[0] > 0}

    def __init__(self, cfg: RegistryConfig, student):
        super().__init__(cfg, student)
        # Imported here: loading a run is the engine's, which builds networks with their features.
        from waterdrop.engine.checkpoint import best_checkpoint, load_net

        self.spec = spec = cfg.train.distillation
        with blamed_on(cfg.file, "train.distillation.teacher"):
            try:
                teacher, teacher_cfg, _ = load_net(best_checkpoint(spec.teacher))
            except (OSError, EOFError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
                reason = (str(err).splitlines() or ["no message"])[0]
                raise ValueError(f"cannot load the teacher from {spec.teacher}: not a readable waterdrop checkpoint "
                                 f"or run folder ({type(err).__name__}: {reason})") from err
            self.teacher_index = torch.full((len(cfg.tasks),), -1, dtype=torch.long)
            for t, task in enumerate(cfg.tasks):
                if task.name not in self.settings:
                    continue
                if task.name not in teacher.task_names:
                    raise ValueError(f"the teacher {spec.teacher} has no task '{task.name}' (it has "
                                     f"{', '.join(teacher.task_names)}); teach only shared tasks (set "
                                     f"train.distillation.tasks.{task.name}.weight: 0)")
                theirs, ours = teacher.heads[task.name], student.heads[task.name]
                if theirs.labels != ours.labels or theirs.kind != ours.kind:
                    raise ValueError(f"task '{task.name}' differs in the teacher: {theirs.kind} head with labels "
                                     f"{theirs.labels}, the student has a {ours.kind} head with {ours.labels}")
                self.teacher_index[t] = teacher.task_names.index(task.name)
        # Held outside the module tree (see the module's docstring).
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.teacher_thresholds = None
        if spec.positive_congruent:
            from waterdrop.engine.checkpoint import recorded_thresholds

            checkpoint = best_checkpoint(spec.teacher)
            self.teacher_thresholds, _ = recorded_thresholds(checkpoint, load_net(checkpoint)[2])
            exported = checkpoint.parent / "model.onnx"
            if exported.is_file():  # what production serves decides at the thresholds in its file
                import onnx

                from waterdrop.contract import read_metadata

                meta = read_metadata({p.key: p.value for p in onnx.load(str(exported)).metadata_props}, str(exported))
                self.teacher_thresholds = {entry["name"]: entry.get("threshold", entry.get("thresholds"))
                                           for entry in meta["tasks"]}
            missing = [name for name in self.settings if name not in (self.teacher_thresholds or {})]
            if missing:
                raise ConfigError(cfg.file, "train.distillation.positive_congruent", f"the teacher {spec.teacher} "
                                  f"has no thresholds for {', '.join(missing)}: evaluate it first (tools/eval.py)")
        self.input_size = teacher_cfg.model.input_size

    def data_needs(self, task, needs):
        if task in self.settings:
            needs.view_size = self.input_size

    def loss_terms(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        """``<task>.loss_distill`` of every taught task in the batch, from the student's outputs;
        the teacher sees ``large_inputs`` (the same views at its input size) where the loader
        gives them, else the student's images resized."""
        task_index = batch.task_index
        mapped = self.teacher_index.to(task_index.device)[task_index]
        rows = (mapped >= 0).nonzero(as_tuple=True)[0]
        if not rows.numel():
            return {}
        if next(self.teacher.parameters()).device != batch.images.device:
            self.teacher.to(batch.images.device)
        self.teacher.eval()
        seen = batch.extras.get("large_inputs", batch.images)[rows].float()
        if seen.shape[-1] != self.input_size or seen.shape[-2] != self.input_size:
            # Antialiased when shrinking: the teacher learnt on area-averaged images (imageio.resize).
            seen = F.interpolate(seen, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                                 antialias=seen.shape[-1] > self.input_size)
        with torch.no_grad():
            # Positive-congruent weights judge the teacher's whole decision (a cascade's second network too).
            teacher_outputs = self.teacher.forward_tasks(seen, mapped[rows],
                                                         complete=self.teacher_thresholds is not None)
        losses = {}
        for name, (weight, temperature) in self.settings.items():
            if name not in batch.outputs:
                continue
            theirs = soft_probabilities(self.teacher.heads[name], teacher_outputs[name], temperature)
            ours = soft_probabilities(batch.net.heads[name], batch.outputs[name], temperature)
            groups = [divergence(theirs[key], ours[key], self.spec.divergence) for key in ours if key in theirs]
            per_sample = torch.stack(groups).mean(dim=0)
            if self.teacher_thresholds is not None:
                per_sample = per_sample * self._congruence(name, teacher_outputs[name], batch)
            losses[f"{name}.loss_distill"] = per_sample.mean() * temperature ** 2 * weight * self.loss_weights[name]
        return losses

    def _congruence(self, name: str, teacher_outputs: dict, batch: LossBatch) -> torch.Tensor:
        """Per sample of ``name`` in the batch: 1 + congruent_weight x the fraction of its decisions
        the teacher gets right (unlabeled samples: 1)."""
        head = self.teacher.heads[name]
        predictions = {k: v.detach().float().cpu().numpy() for k, v in
                       self.teacher.task_predictions(name, teacher_outputs).items()}
        scores, truth = head.score_and_truth(predictions, batch.targets[name].cpu().numpy())
        kind = kind_of(head.kind)
        entry = {"labels": head.labels, **({kind.threshold_key: self.teacher_thresholds[name]}
                                           if kind.threshold_key else {})}
        decided = kind.decide(entry, {"prob": scores})
        truth = truth.reshape(len(truth), -1)
        known = truth >= 0
        right = ((decided == truth) & known).sum(1) / np.maximum(known.sum(1), 1)
        labeled = batch.labeled[name].cpu().numpy()
        weight = 1 + self.spec.congruent_weight * np.where(labeled, right, 0.0)
        return torch.as_tensor(weight, dtype=torch.float32, device=batch.images.device)
