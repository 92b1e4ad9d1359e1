"""The prior relation graph between tags: ``implies`` (forest -> tree, child -> parent, applied
transitively) and ``excludes`` (mutually exclusive labels; the higher score wins).

Torch-free: evaluation and the ONNX runtime apply the same code, so partner teams get the
same tags as eval reports.
"""

from __future__ import annotations

import numpy as np


class RelationError(ValueError):
    """The graph names an unknown label, has an implies-cycle, or contradicts itself."""


class RelationGraph:
    """Validated relations between the labels of one task.

    Args:
        labels: the task's labels.
        implies: label -> labels it implies (direct); closed transitively here.
        excludes: groups of labels of which at most one may be present.

    Raises:
        RelationError: unknown label, a cycle of implications, or a label whose implied
            set (itself included) holds two labels of one excludes group.
    """

    def __init__(self, labels: list[str], implies: dict[str, list[str]] | None = None,
                 excludes: list[list[str]] | None = None):
        self.labels = list(labels)
        self.implies = {k: list(v) for k, v in (implies or {}).items()}
        self.excludes = [list(group) for group in (excludes or [])]
        known = set(self.labels)
        for child, parents in self.implies.items():
            for name in [child, *parents]:
                if name not in known:
                    raise RelationError(f"implies: unknown label '{name}'; known labels: {', '.join(self.labels)}")
        for group in self.excludes:
            if len(group) < 2 or len(set(group)) != len(group):
                raise RelationError(f"excludes: {group} must list two or more different labels")
            for name in group:
                if name not in known:
                    raise RelationError(f"excludes: unknown label '{name}'; known labels: {', '.join(self.labels)}")
        self.closure = {label: self._reach(label) for label in self.labels}
        for label, implied in self.closure.items():
            members = {label, *implied}
            for group in self.excludes:
                clash = [g for g in group if g in members]
                if len(clash) > 1:
                    via = f"{label} implies {', '.join(sorted(implied))}" if implied else label
                    raise RelationError(f"contradiction: {via}, but excludes lists {clash} as mutually exclusive")

    def _reach(self, start: str) -> set[str]:
        """Labels implied by ``start``, transitively; a path back to ``start`` is a cycle."""
        seen, stack = set(), [(start, [start])]
        while stack:
            label, path = stack.pop()
            for parent in self.implies.get(label, []):
                if parent == start:
                    raise RelationError(f"implies-cycle: {' -> '.join([*path, parent])}")
                if parent not in seen:
                    seen.add(parent)
                    stack.append((parent, [*path, parent]))
        return seen

    def __bool__(self) -> bool:
        return bool(self.implies or self.excludes)

    def to_dict(self) -> dict:
        return {"implies": self.implies, "excludes": self.excludes}

    def apply(self, scores: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        """Tag decisions (N, L) after the graph: implied labels are added (an implied label
        competes with the score of its strongest implier); in every excludes group only the
        highest-scoring present label stays, and labels implying a removed one go too."""
        index = {label: j for j, label in enumerate(self.labels)}
        closure = [[index[p] for p in self.closure[label]] for label in self.labels]
        out = decisions.astype(bool).copy()
        for row in range(len(out)):
            effective = scores[row].astype(float).copy()
            for j in np.nonzero(out[row])[0]:
                for p in closure[j]:
                    out[row, p] = True
                    effective[p] = max(effective[p], scores[row, j])
            for group in self.excludes:
                present = [index[g] for g in group if out[row, index[g]]]
                if len(present) < 2:
                    continue
                keep = max(present, key=lambda j: effective[j])
                for removed in present:
                    if removed == keep:
                        continue
                    out[row, removed] = False
                    for j in range(len(self.labels)):
                        if removed in closure[j]:
                            out[row, j] = False
        return out
