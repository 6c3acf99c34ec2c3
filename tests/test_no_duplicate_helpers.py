"""One home per helper: no function (or method) of the same name and the same normalised body is defined in two places
across the library, the benchmarks and the tests.

"Normalised" is the AST of the body without its docstring, so comments, blank lines, formatting and docstrings do not
hide a copy. Trivial bodies (fewer than ``MIN_BODY_NODES`` AST nodes: ``pass``, ``...``, ``return self.x``, a one-call
delegation, two attribute stores) are not helpers and are ignored.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("k5model", "k5data", "evaluation", "bench", "tests")
MIN_BODY_NODES = 16

# Copies in files whose owners have not yet moved them to one home; each entry must still be a real duplicate (the
# last test fails once it is fixed, so the entry is then deleted). Remove entries, never add them.
PENDING: dict[str, frozenset[str]] = {
}


def _body_key(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, int]:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    module = ast.Module(body=body, type_ignores=[])
    return ast.dump(module, include_attributes=False), sum(1 for _ in ast.walk(module))


def find_duplicates(root: Path, folders: tuple[str, ...] = SCANNED) -> dict[str, list[str]]:
    """Function name -> its places ``path:line`` (relative to ``root``), for every name defined with the same
    non-trivial normalised body in two or more places."""
    places: dict[tuple[str, str], list[str]] = defaultdict(list)
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    key, size = _body_key(node)
                    if size >= MIN_BODY_NODES:
                        places[(node.name, key)].append(f"{rel}:{node.lineno}")
    return {name: where for (name, _), where in places.items() if len(where) > 1}


def _files(where: list[str]) -> frozenset[str]:
    return frozenset(p.rsplit(":", 1)[0] for p in where)


def test_no_helper_is_defined_twice():
    dupes = {name: where for name, where in find_duplicates(ROOT).items() if PENDING.get(name) != _files(where)}
    assert not dupes, "defined more than once (keep one, import it elsewhere): " + "; ".join(
        f"{name} at {' and '.join(where)}" for name, where in sorted(dupes.items()))


def test_pending_entries_are_still_duplicates():
    found = {name: _files(where) for name, where in find_duplicates(ROOT).items()}
    fixed = [name for name, files in PENDING.items() if found.get(name) != files]
    assert not fixed, f"no longer duplicated, delete from PENDING: {fixed}"


SYNTHETIC_HELPER = '''
def rel(a, b):
    """Relative error."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
'''


def test_flags_a_synthetic_duplicate_and_names_both_places(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "bench" / "common.py").write_text(SYNTHETIC_HELPER)
    # same body, other docstring, comments and formatting: still a copy
    (tmp_path / "tests" / "test_x.py").write_text(
        "import torch\n\n\ndef rel(a, b):\n    # copied\n"
        "    return ((a.float() - b.float()).norm()\n            / b.float().norm().clamp_min(1e-12)).item()\n")
    assert find_duplicates(tmp_path, ("bench", "tests")) == {"rel": ["bench/common.py:2", "tests/test_x.py:4"]}


def test_ignores_trivial_bodies_and_different_bodies(tmp_path):
    (tmp_path / "k5model").mkdir()
    (tmp_path / "k5model" / "a.py").write_text(
        "def replace(self, **c):\n    return dataclasses.replace(self, **c)\n\n\n"
        "def rel(a, b):\n    return ((a - b).norm() / b.norm()).item()\n")
    (tmp_path / "k5model" / "b.py").write_text(
        "def replace(self, **c):\n    return dataclasses.replace(self, **c)\n\n\n"
        "def rel(a, b):\n    return ((a - b).abs().max() / b.abs().max()).item()\n")
    assert find_duplicates(tmp_path, ("k5model",)) == {}
