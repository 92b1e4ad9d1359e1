"""Where a training run's wall time goes: start-up, training, validation, checkpoints, final evaluation.

mmengine calls a hook method on every hook in priority order, so two hooks bracket each phase: one
that runs first (``HIGHEST``) and one that runs last (``LOWEST``). The checkpoint hook writes in
``after_train_epoch`` (the last checkpoint) and ``after_val_epoch`` (the best one), so the time
between the two brackets of those calls is checkpoint writing (and the run's own bookkeeping).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmengine.hooks import Hook

PHASES = ("startup", "training", "validation", "checkpoints", "final_evaluation")


class PhaseClock:
    """Seconds per phase of one run, started when the process (or the caller) began."""

    def __init__(self, started: float | None = None):
        self.started = started if started is not None else time.time()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._open: dict[str, float] = {"startup": self.started}

    def begin(self, phase: str) -> None:
        self._open[phase] = time.time()

    def end(self, phase: str) -> None:
        began = self._open.pop(phase, None)
        if began is not None:
            self.seconds[phase] += time.time() - began

    def hooks(self) -> list[Hook]:
        return [_Opening(self), _Closing(self)]

    def record(self) -> dict:
        total = time.time() - self.started
        rounded = {f"{phase}_s": round(value, 2) for phase, value in self.seconds.items()}
        return {**rounded, "other_s": round(total - sum(self.seconds.values()), 2), "total_s": round(total, 2),
                "total_over_training": round(total / self.seconds["training"], 2) if self.seconds["training"] else None}

    def write(self, work_dir: Path) -> dict:
        record = self.record()
        (Path(work_dir) / "timing.json").write_text(json.dumps(record, indent=2))
        return record

    @staticmethod
    def summary(r: dict) -> str:
        """One line of a record (what ``write`` returned, so the line and the file agree)."""
        parts = ", ".join(f"{phase.replace('_', ' ')} {r[f'{phase}_s']:.0f} s" for phase in PHASES)
        ratio = f" ({r['total_over_training']:.2f}x the training loop)" if r["total_over_training"] else ""
        return f"wall time {r['total_s']:.0f} s{ratio}: {parts}, other {r['other_s']:.0f} s"


class _Opening(Hook):
    priority = "HIGHEST"

    def __init__(self, clock: PhaseClock):
        self.clock = clock

    def before_train(self, runner) -> None:
        self.clock.end("startup")

    def before_train_epoch(self, runner) -> None:
        self.clock.begin("training")

    def after_train_epoch(self, runner) -> None:
        self.clock.end("training")
        self.clock.begin("checkpoints")

    def before_val(self, runner) -> None:
        self.clock.begin("validation")

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.clock.end("validation")
        self.clock.begin("checkpoints")


class _Closing(Hook):
    priority = "LOWEST"

    def __init__(self, clock: PhaseClock):
        self.clock = clock

    def after_train_epoch(self, runner) -> None:
        self.clock.end("checkpoints")

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.clock.end("checkpoints")
