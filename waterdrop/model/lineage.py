"""Which tensors of a MultiTaskNet belong to which task, and a content hash per task.

A task owns its head, its copy of every branched BatchNorm and its features' per-task
modules (``features.<key>.per_task.<task>``); everything else (the trunk's convolutions and
unbranched BatchNorms, a fusion backbone) is shared. Training some tasks of a trained model
changes only what they own, so every other task's outputs stay bit for bit as they were; the
hash of a task covers everything its outputs depend on, so equal hashes prove it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, is_dataclass

import torch
from torch import nn

from waterdrop.config import RegistryConfig, TaskConfig, config_to_dict
from waterdrop.model.multitask import MultiTaskNet
from waterdrop.model.task_bn import TaskBatchNorm
from waterdrop.model.trunk import resolved_head_conv

_BRANCH = re.compile(r"\.branches\.(\d+)\.")


def task_modules(net: MultiTaskNet, name: str) -> list[nn.Module]:
    """The modules that belong to task ``name`` alone."""
    t = net.task_names.index(name)
    owned = [net.heads[name]]
    owned += [module.branches[t] for module in net.modules() if isinstance(module, TaskBatchNorm)]
    owned += [feature.per_task[name] for feature in net.features.values() if name in feature.per_task]
    return owned


def _owners(net: MultiTaskNet) -> dict[int, str]:
    """id of every owned parameter and buffer -> its task."""
    owners = {}
    for name in net.task_names:
        for module in task_modules(net, name):
            owners.update((id(tensor), name) for tensor in [*module.parameters(), *module.buffers()])
    return owners


def canonical_key(key: str, task_names: list[str]) -> str:
    """``key`` with every BatchNorm branch named by its task instead of its position, so that a
    task's tensors have the same names in models whose task lists differ."""
    return _BRANCH.sub(lambda match: f".branches.{task_names[int(match.group(1))]}.", key)


def owned_state(net: MultiTaskNet) -> dict[str, tuple[str | None, str, torch.Tensor]]:
    """Every ``state_dict`` entry: key -> (owning task or None for shared, canonical key, tensor)."""
    owners = _owners(net)
    return {key: (owners.get(id(tensor)), canonical_key(key, net.task_names), tensor)
            for key, tensor in net.state_dict(keep_vars=True).items()}


def _digest(update, entries: list[tuple[str, torch.Tensor]]) -> None:
    for key, tensor in sorted(entries, key=lambda entry: entry[0]):
        value = tensor.detach().cpu().contiguous()
        update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        update(value.reshape(-1).view(torch.uint8).numpy().tobytes())


def task_identity(task: TaskConfig) -> dict:
    """What a task's outputs mean and how they are computed besides its tensors: its labels, head,
    relations and features' settings."""
    return {"labels": task.labels, "negative_label": task.negative_label, "head": task.head_type,
            "head_args": task.head_args, "relations": task.relations.to_dict() if task.relations else None,
            "features": {key: asdict(value) if is_dataclass(value) else value
                         for key, value in sorted(task.features.items())}}


def model_identity(cfg: RegistryConfig) -> dict:
    """The model section without where its weights first came from (a child takes them from its parent)."""
    model = config_to_dict(cfg)["model"]
    model.pop("pretrained", None)
    # as built ("auto" is true or false by the backbone); a key added later: models without it keep
    # the hashes they had
    model["head_conv"] = resolved_head_conv(model["backbone"], model.get("head_conv", False))
    if not model["head_conv"]:
        model.pop("head_conv")
    if model.get("fusion"):
        model["fusion"].pop("pretrained", None)
    return model


def task_hashes(net: MultiTaskNet, cfg: RegistryConfig) -> dict[str, str]:
    """Per task, a SHA-256 of what its outputs depend on: the shared tensors, its own tensors,
    the model's settings (preprocessing, branching) and its identity (``task_identity``).
    Thresholds are not in it: they decide, they do not compute."""
    state = owned_state(net)
    shared = hashlib.sha256()
    _digest(shared.update, [(canonical, tensor) for owner, canonical, tensor in state.values() if owner is None])
    shared.update(json.dumps(model_identity(cfg), sort_keys=True, default=str).encode())
    hashes = {}
    for task in cfg.tasks:
        digest = hashlib.sha256(shared.digest())
        digest.update(json.dumps(task_identity(task), sort_keys=True, default=str).encode())
        _digest(digest.update, [(canonical, tensor) for owner, canonical, tensor in state.values()
                                if owner == task.name])
        hashes[task.name] = digest.hexdigest()
    return hashes


def embedding_hash(net: MultiTaskNet, cfg: RegistryConfig) -> str:
    """A SHA-256 of what the image embedding depends on (``MultiTaskNet.embedding``): the shared
    tensors and the model's settings, or with no shared level every task's hash. It stays the
    same while tasks are trained on the frozen trunk of their parent, so a pool index built
    with the parent's embeddings serves its children."""
    if not net.embedding_levels():
        return model_hash(task_hashes(net, cfg))
    digest = hashlib.sha256(b"embedding:levels-avg-l2|")
    _digest(digest.update, [(canonical, tensor) for owner, canonical, tensor in owned_state(net).values()
                            if owner is None])
    digest.update(json.dumps(model_identity(cfg), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def model_hash(hashes: dict[str, str]) -> str:
    """One hash of a whole model from its tasks' (``task_hashes``)."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def inherit(child: MultiTaskNet, parent_state: dict[str, torch.Tensor], parent_tasks: list[str],
            trained: set[str], fresh: set[str] = frozenset()) -> dict[str, str]:
    """Load into ``child`` what it takes over from a trained parent network (its ``state_dict``
    and task list): every shared tensor, and every task's own tensors except those of a task
    in ``trained`` that the parent lacks or holds in another shape. A task in ``fresh`` (its
    labels or head changed) takes only its BatchNorm copies from the parent: its head and
    features start anew. An added task's BatchNorm copies start from the parent's first task's.

    Returns per task where its tensors came from ("parent", "parent, head fresh", "new").

    Raises:
        ValueError: a shared tensor, or one of a task not in ``trained``, is missing from the
            parent or has another shape (the trunk or the task differs).
    """
    parent = {canonical_key(key, parent_tasks): value for key, value in parent_state.items()}
    seed = parent_tasks[0]
    state, counts = {}, {name: 0 for name in child.task_names}
    for key, (owner, canonical, tensor) in owned_state(child).items():
        source = canonical
        if owner is not None and owner not in parent_tasks:
            source = canonical.replace(f".branches.{owner}.", f".branches.{seed}.")
        value = parent.get(source)
        if owner in fresh and ".branches." not in canonical:
            value = None
        fits = value is not None and value.shape == tensor.shape
        if not fits and (owner is None or owner not in trained):
            what = "shared tensor" if owner is None else f"tensor of task {owner}"
            problem = "missing from" if value is None else f"shaped {tuple(value.shape)}, not {tuple(tensor.shape)}, in"
            raise ValueError(f"{what} {key} is {problem} the parent model: its network differs")
        if fits:
            state[key] = value.to(tensor.dtype)
        else:
            state[key] = tensor.detach()
            counts[owner] += 1
    child.load_state_dict(state)
    origin = {}
    for name in child.task_names:
        if name not in parent_tasks:
            origin[name] = "new (BatchNorm copies from the parent's task " + seed + ")"
        else:
            origin[name] = "parent" if not counts[name] else (
                f"parent's BatchNorm copies, head and features fresh ({counts[name]} tensors)" if name in fresh
                else f"parent, {counts[name]} tensors fresh (their shape changed)")
    return origin


@torch.no_grad()
def output_differences(before: MultiTaskNet, after: MultiTaskNet, images: torch.Tensor,
                       tasks: list[str]) -> dict[str, float]:
    """Per task in ``tasks``, the largest absolute difference between the deploy outputs of two
    networks on ``images`` (0.0: bit for bit the same)."""
    old, new = before.eval().forward_all(images), after.eval().forward_all(images)
    differences = {}
    for name in tasks:
        keys = [key for key in old if key.startswith(f"{name}.")]
        differences[name] = max(float((old[key].double() - new[key].double()).abs().max()) if key in new
                                else float("inf") for key in keys)
    return differences
