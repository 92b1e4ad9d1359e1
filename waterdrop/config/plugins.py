"""What the head and kind plugins declare, read from their source without importing them.

A task YAML names a head (``head.type``) and its arguments, and the head's kind decides which
``deploy`` keys mean something. Checking that needs the heads' and kinds' declarations, but
importing a head imports torch, and the config layer sits below both: a registry must load
in the torch-free runtime install. So their modules are parsed (``ast``), never executed:

* a head is a class decorated with ``@register_head`` in ``waterdrop.heads``; its ``kind`` is a
  string literal in its class body (or a base class's), its YAML arguments are the keyword-only
  parameters of its ``__init__`` (any key where it takes ``**kwargs``);
* a kind is a class decorated with ``@register_kind`` in ``waterdrop.kinds``; ``name``,
  ``uses_target``, ``uses_prevalence``, ``uses_label_targets`` and ``samplers`` are literals in
  its class body or a base class's.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_BUILT_IN_ARGS = ("self", "in_channels", "labels", "negative_label")


@dataclass(frozen=True)
class HeadDeclaration:
    name: str
    kind: str
    args: tuple[str, ...]
    any_args: bool = False


@dataclass(frozen=True)
class KindDeclaration:
    name: str
    uses_target: bool = True
    uses_prevalence: bool = False
    uses_label_targets: bool = False
    samplers: tuple[str, ...] = ("plain",)


@dataclass
class _Class:
    bases: list[str]
    literals: dict[str, Any]
    init: ast.FunctionDef | None
    registered_by: set[str]


def _package_files(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package} not found")
    return sorted(p for folder in spec.submodule_search_locations for p in Path(folder).glob("*.py"))


def _classes(files: list[Path]) -> dict[str, _Class]:
    classes = {}
    for path in files:
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if not isinstance(node, ast.ClassDef):
                continue
            literals, init = {}, None
            for item in node.body:
                targets = item.targets if isinstance(item, ast.Assign) else [item.target] if isinstance(
                    item, ast.AnnAssign) and item.value is not None else []
                for target in targets:
                    if isinstance(target, ast.Name):
                        try:
                            literals[target.id] = ast.literal_eval(item.value)
                        except ValueError:
                            pass  # not a literal: not a declaration
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    init = item
            decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
            classes[node.name] = _Class(bases, literals, init, decorators)
    return classes


def _lineage(classes: dict[str, _Class], name: str) -> list[_Class]:
    """The class and its bases found among ``classes``, nearest first."""
    found, queue = [], [name]
    while queue:
        current = classes.get(queue.pop(0))
        if current is not None and current not in found:
            found.append(current)
            queue.extend(current.bases)
    return found


def _literal(lineage: list[_Class], key: str, default: Any) -> Any:
    return next((c.literals[key] for c in lineage if key in c.literals), default)


@cache
def head_declarations() -> dict[str, HeadDeclaration]:
    """Every registered head by class name (as written in ``head.type``)."""
    base = importlib.util.find_spec("waterdrop.model.head")
    classes = _classes([Path(base.origin), *_package_files("waterdrop.heads")])
    heads = {}
    for name, cls in classes.items():
        if "register_head" not in cls.registered_by:
            continue
        lineage = _lineage(classes, name)
        init = next((c.init for c in lineage if c.init is not None), None)
        args = tuple(a.arg for a in init.args.kwonlyargs if a.arg not in _BUILT_IN_ARGS) if init else ()
        heads[name] = HeadDeclaration(name, _literal(lineage, "kind", ""), args,
                                      any_args=bool(init and init.args.kwarg))
    return heads


@cache
def kind_declarations() -> dict[str, KindDeclaration]:
    """Every registered kind by name."""
    classes = _classes(_package_files("waterdrop.kinds"))
    kinds = {}
    for name, cls in classes.items():
        if "register_kind" not in cls.registered_by:
            continue
        lineage = _lineage(classes, name)
        values = {key: _literal(lineage, key, default) for key, default in (
            ("uses_target", True), ("uses_prevalence", False), ("uses_label_targets", False),
            ("samplers", ("plain",)))}
        declared = _literal(lineage, "name", "")
        kinds[declared] = KindDeclaration(declared, **{**values, "samplers": tuple(values["samplers"])})
    return kinds
