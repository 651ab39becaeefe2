"""Stage keys: the sha256 of everything that determines a stage's output, so a finished stage is never redone and a
stale one is never reused.

A key covers the stage's config values, its inputs' keys, and its code. The code is found by one rule, not by hand:
the stage's module and every project module it imports, transitively (imports inside functions too), except the
plumbing that only moves bytes or holds config classes (`PLUMBING`; config values are hashed as values). Each
module counts by its syntax tree without docstrings, so editing a comment, a docstring or the layout of a line
reuses every stage, while a change to the code that tokenizes data invalidates each stage that uses it.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("pipeline", "tasks")
# Modules that shape no stage's output: storage, keys, the run context and summary, logging, errors, the cache
# folder, input checks (they refuse, never change, an output) and config classes (their values are in each key).
PLUMBING = frozenset({
    "pipeline.cache", "pipeline.checkpoints", "pipeline.config", "pipeline.errors", "pipeline.keys",
    "pipeline.preflight", "pipeline.progress", "pipeline.run", "pipeline.stage", "pipeline.store", "pipeline.summary",
})


def stage_key(stage: str, determinants: dict[str, Any]) -> str:
    """sha256 of everything that determines a stage's output, canonically serialised."""
    blob = json.dumps({"stage": stage, **determinants}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def code_modules(module: str) -> list[str]:
    """`module` and the project modules it imports, transitively, plumbing left out; sorted."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen or name in PLUMBING:
            continue
        seen.add(name)
        pending += [imported for imported in _imports(name) if _is_project_module(imported)]
    return sorted(seen)


def code_version(module: str) -> str:
    """sha256 over the docstring-free syntax trees of `code_modules(module)`."""
    digest = hashlib.sha256()
    for name in code_modules(module):
        digest.update(name.encode() + b"\0" + _normalized_source(name).encode() + b"\0")
    return digest.hexdigest()


def _module_file(name: str) -> Path:
    """The source file of a project module, found without importing it (or anything it imports)."""
    path = PROJECT_ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_project_module(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_PACKAGES and _module_file(name).is_file()


def _imports(name: str) -> list[str]:
    """Modules named by `import x` / `from x import y` anywhere in the module (`x.y` too, where y is a module)."""
    tree = ast.parse(_module_file(name).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _normalized_source(name: str) -> str:
    """The module's syntax tree without docstrings: comments, docstrings and formatting do not count."""
    tree = ast.parse(_module_file(name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)
