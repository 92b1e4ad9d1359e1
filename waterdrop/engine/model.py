"""mmengine wrapper around MultiTaskNet: losses per task, predictions for the metric."""

from __future__ import annotations

import torch
from mmengine.model import BaseModel

from waterdrop.config import RegistryConfig
from waterdrop.model.multitask import MultiTaskNet


class WaterdropModel(BaseModel):
    """Losses come back as ``{"<task>.<term>": value}`` (already times the task's loss
    weight) so logs and TensorBoard show every term.

    A batch whose loss is NaN or infinite is skipped (no optimizer step, and the BatchNorm
    running statistics its forward pass touched are restored) and counted in
    ``nonfinite_batches``; ``max_nonfinite_streak`` such batches in a row stop training
    with an error naming the terms.
    """

    def __init__(self, cfg: RegistryConfig, max_nonfinite_streak: int = 20):
        super().__init__()
        self.net = MultiTaskNet(cfg)
        self.loss_weights = {t.name: t.loss_weight for t in cfg.tasks}
        self.max_nonfinite_streak = max_nonfinite_streak
        self.nonfinite_batches = 0
        self._nonfinite_streak = 0

    def forward(self, inputs, task_index, targets=None, mode="tensor", **unused):
        outputs = self.net.forward_tasks(inputs, task_index)
        if mode == "loss":
            losses = {}
            for name, out in outputs.items():
                for term, value in self.net.heads[name].loss(out, targets[name]).items():
                    losses[f"{name}.{term}"] = value * self.loss_weights[name]
            return losses
        if mode == "predict":
            return self._per_sample(outputs, targets)
        return outputs

    def _per_sample(self, outputs, targets) -> list[dict]:
        return [{"task": name, "score": s, "truth": t}
                for name, (scores, truth) in self.net.scores_and_truth(outputs, targets).items()
                for s, t in zip(scores, truth)]

    def train_step(self, data, optim_wrapper):
        # BN statistics are updated by the forward pass itself; a NaN batch would poison them.
        buffers = list(self.net.buffers())
        saved = [b.detach().clone() for b in buffers]
        with optim_wrapper.optim_context(self):
            data = self.data_preprocessor(data, True)
            losses = self._run_forward(data, mode="loss")
        loss, log_vars = self.parse_losses(losses)
        if torch.isfinite(loss):
            self._nonfinite_streak = 0
            optim_wrapper.update_params(loss)
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
            for buffer, copy in zip(buffers, saved):
                buffer.copy_(copy)
        return {"nonfinite_skipped": torch.tensor(1.0)}
