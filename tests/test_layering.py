"""Layering: every module of our packages is parsed with ``ast`` and each import is checked against the layer rules.

Every form of import counts: module-level and function-local ``import``/``from ... import`` (relative ones resolved),
imports under ``if TYPE_CHECKING:``, and ``importlib.import_module("...")`` / ``__import__("...")`` with a string
literal. Nothing is imported to do this, so a breach is found even in a module whose import would fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Our top-level packages, bottom layer first.
OUR_PACKAGES = ("k5model", "k5data", "evaluation", "assets", "orchestration", "ui", "k5cli", "bench")


@dataclass(frozen=True, kw_only=True)
class LayerRule:
    """What one of our packages may import."""

    package: str
    """Top-level package the rule applies to (every module under it)."""
    allowed_ours: frozenset[str] | None
    """Our packages it may import besides itself; ``None``: any of ours (a top layer)."""
    forbidden_external: frozenset[str] = frozenset()
    """Third-party families it must never import; ``"dagster"`` also covers ``dagster_pipes``, ``dagster_k8s``..."""


RULES = (
    LayerRule(package="k5model", allowed_ours=frozenset(),
              forbidden_external=frozenset({"dagster", "mlflow", "gradio"})),
    LayerRule(package="k5data", allowed_ours=frozenset({"k5model"}),
              forbidden_external=frozenset({"dagster", "mlflow", "gradio"})),
    LayerRule(package="evaluation", allowed_ours=frozenset({"k5model", "k5data"}),
              forbidden_external=frozenset({"dagster", "gradio"})),
    # assets, orchestration, ui, k5cli and bench are on top: they may import any layer below.
    *(LayerRule(package=p, allowed_ours=None) for p in ("assets", "orchestration", "ui", "k5cli", "bench")),
)


@dataclass(frozen=True)
class Import:
    """One import found in a module's source."""

    module: str
    """Absolute dotted name imported (relative imports resolved)."""
    line: int
    """1-based line of the import statement or call."""
    how: str
    """``import``, ``from`` or ``import_module`` (string literal passed to importlib.import_module/__import__)."""


@dataclass(frozen=True)
class Breach:
    """An import a layer rule forbids."""

    module: str
    path: Path
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.module} ({self.path}:{self.line}) imports {self.imported!r}: {self.why}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(current: str, is_package: bool, level: int, target: str | None) -> str:
    # The package a relative import starts from: the module itself for __init__, else its parent.
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level - 1 > len(base) - 1:
        raise ValueError(f"relative import beyond the top-level package in {current}: level {level}")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(source: str, current: str, is_package: bool) -> list[Import]:
    """Every import in ``source`` (the module ``current``), function-local ones included."""
    tree = ast.parse(source)
    # Names bound to importlib.import_module in this module (``from importlib import import_module as im``).
    import_module_names = {"__import__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "importlib":
            import_module_names |= {a.asname or a.name for a in node.names if a.name == "import_module"}
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno, "import") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(current, is_package, node.level, node.module) if node.level
                    else node.module or "")
            # ``from pkg import sub`` may import the submodule pkg.sub: record both names.
            found.append(Import(base, node.lineno, "from"))
            found += [Import(f"{base}.{a.name}", node.lineno, "from") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            is_import_call = ((isinstance(func, ast.Attribute) and func.attr == "import_module")
                              or (isinstance(func, ast.Name) and func.id in import_module_names))
            arg = node.args[0]
            if is_import_call and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    name = _resolve_relative(current, is_package, level, name.lstrip(".") or None)
                found.append(Import(name, node.lineno, "import_module"))
    return found


def _external_family(top: str, families: frozenset[str]) -> str | None:
    for family in families:
        if top == family or top.startswith(family + "_"):
            return family
    return None


def layering_breaches(root: Path, rules: tuple[LayerRule, ...] = RULES,
                      ours: tuple[str, ...] = OUR_PACKAGES) -> tuple[list[Breach], dict[str, int]]:
    """Breaches of ``rules`` in every ``*.py`` under ``root/<package>``, and the number of modules read per package."""
    breaches: list[Breach] = []
    modules_read: dict[str, int] = {}
    for rule in rules:
        package_dir = root / rule.package
        paths = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
        modules_read[rule.package] = len(paths)
        for path in paths:
            current = module_name(root, path)
            for imp in imports_of(path.read_text(encoding="utf-8"), current, path.name == "__init__.py"):
                top = imp.module.split(".")[0]
                why = None
                if top in ours and top != rule.package and rule.allowed_ours is not None \
                        and top not in rule.allowed_ours:
                    allowed = ", ".join(sorted(rule.allowed_ours))
                    why = (f"{rule.package} may import only {allowed} of our packages" if allowed
                           else f"{rule.package} may import none of our packages")
                elif (family := _external_family(top, rule.forbidden_external)) is not None:
                    why = f"{rule.package} must never import {family}"
                if why is not None:
                    breaches.append(Breach(current, path.relative_to(root), imp.line, imp.module, why))
    # One line per (module, line, top-level package): ``from x import a, b`` is one breach, not three.
    unique: dict[tuple[str, int, str], Breach] = {}
    for b in breaches:
        unique.setdefault((b.module, b.line, b.imported.split(".")[0]), b)
    return sorted(unique.values(), key=lambda b: (b.module, b.line)), modules_read


def test_our_packages_respect_the_layers() -> None:
    breaches, modules_read = layering_breaches(REPO)
    # A checker that reads nothing would pass: every package must exist and hold modules.
    empty = [p for p, n in modules_read.items() if n == 0]
    assert not empty, f"no modules found under {empty} in {REPO}: did a package move? update OUR_PACKAGES/RULES"
    if breaches:
        pytest.fail(f"{len(breaches)} layering breach(es) (k5model imports nothing of ours; k5data only k5model; "
                    "evaluation no Dagster/Gradio/assets/orchestration/ui/k5cli):\n"
                    + "\n".join(f"  {b}" for b in breaches), pytrace=False)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_flags_every_import_form_and_passes_clean_modules(tmp_path: Path) -> None:
    for package in OUR_PACKAGES:
        _write(tmp_path, f"{package}/__init__.py", "")
    # Clean: the allowed direction of every layer, plus stdlib/torch and lookalike names that are not ours.
    _write(tmp_path, "k5model/clean.py", "import os\nimport torch\nfrom . import sibling\nimport k5modelx\n")
    _write(tmp_path, "k5data/clean.py", "from k5model import crossdit\nimport duckdb\n")
    _write(tmp_path, "evaluation/clean.py", "import mlflow\nfrom k5data.curation import catalog\n")
    _write(tmp_path, "assets/clean.py", "import dagster as dg\nfrom evaluation import prompts\nimport mlflow\n")
    _write(tmp_path, "ui/clean.py", "import gradio\nfrom evaluation.sbs import sbs_scores\n")
    # Breaches, one per form.
    _write(tmp_path, "k5model/training/__init__.py", "")
    _write(tmp_path, "k5model/training/run.py",
           "import torch\n\n\ndef main():\n    from k5data.loading import loader\n")
    _write(tmp_path, "k5model/lazy.py", "import importlib\n\n\ndef f():\n"
           "    return importlib.import_module('dagster_pipes')\n")
    _write(tmp_path, "k5model/aliased.py", "from importlib import import_module as im\nx = im('orchestration.demo')\n")
    _write(tmp_path, "k5model/relative.py", "from ..bench import common\n")  # escapes the package: an error
    _write(tmp_path, "k5data/typed.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mlflow\n")
    _write(tmp_path, "evaluation/sbs/__init__.py", "from ...ui import annotation_app\n")
    _write(tmp_path, "evaluation/app.py", "import gradio as gr\nfrom assets import sbs\n")

    with pytest.raises(ValueError, match="beyond the top-level package"):
        layering_breaches(tmp_path)
    (tmp_path / "k5model/relative.py").write_text("from . import attention\nfrom .training import run\n")
    _write(tmp_path, "evaluation/sbs/__init__.py", "from ..prompts import load\nfrom .. import judgments\n")
    _write(tmp_path, "evaluation/sbs/report.py", "__import__('k5cli.main')\n")

    breaches, modules_read = layering_breaches(tmp_path)
    found = {(b.module, b.line, b.imported) for b in breaches}
    assert found == {
        ("k5model.training.run", 5, "k5data.loading"),
        ("k5model.lazy", 5, "dagster_pipes"),
        ("k5model.aliased", 2, "orchestration.demo"),
        ("k5data.typed", 3, "mlflow"),
        ("evaluation.app", 1, "gradio"),
        ("evaluation.app", 2, "assets"),
        ("evaluation.sbs.report", 1, "k5cli.main"),
    }, "\n".join(map(str, breaches))
    assert modules_read["k5model"] == 7 and modules_read["bench"] == 1
    message = next(str(b) for b in breaches if b.module == "k5model.training.run")
    assert "k5model/training/run.py:5" in message and "'k5data.loading'" in message
    assert "none of our packages" in message


def test_relative_imports_resolve_from_the_module_or_package() -> None:
    names = {i.module for i in imports_of("from . import a\nfrom ..b import c\n", "k5data.latents.encode", False)}
    assert names == {"k5data.latents", "k5data.latents.a", "k5data.b", "k5data.b.c"}
    names = {i.module for i in imports_of("from . import a\n", "k5data.latents", True)}
    assert names == {"k5data.latents", "k5data.latents.a"}
