"""Thin assets (issue 23): every asset and asset check defined in ``assets/`` has a body of at most 40 lines, and
every asset check carries a description (the Dagster UI shows it beside the check's result).

The functions are taken from the loaded ``orchestration.definitions.defs``, so asset factories (one function, many
stage assets) are measured once per function, exactly as Dagster runs them.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_BODY_LINES = 40


def body_lines(fn: Callable) -> int:
    """Non-blank source lines of ``fn``'s body, comments included; its decorators, signature and docstring excluded."""
    fn = inspect.unwrap(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        raise TypeError(f"{fn.__qualname__}: expected a function definition, got {type(node).__name__}")
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]
    if not body:
        return 0
    lines = textwrap.dedent(inspect.getsource(fn)).splitlines()[body[0].lineno - 1: body[-1].end_lineno]
    return sum(1 for line in lines if line.strip())


def _where(fn: Callable) -> str:
    fn = inspect.unwrap(fn)
    path = Path(inspect.getsourcefile(fn)).resolve()
    return f"{path.relative_to(REPO)}:{inspect.getsourcelines(fn)[1]} {fn.__qualname__}"


@pytest.fixture(scope="module")
def asset_functions() -> dict[Callable, list[str]]:
    """Each compute function defined under ``assets/`` -> the asset keys / check names it computes."""
    from orchestration.definitions import defs

    functions: dict[Callable, list[str]] = defaultdict(list)
    for assets_def in defs.get_repository_def().asset_graph.assets_defs:
        if not assets_def.is_executable:
            continue
        fn = inspect.unwrap(assets_def.op.compute_fn.decorated_fn)
        if not (fn.__module__ == "assets" or fn.__module__.startswith("assets.")):
            continue
        names = [key.to_user_string() for key in assets_def.keys]
        names += [f"{key.asset_key.to_user_string()}:{key.name}" for key in assets_def.check_keys]
        functions[fn].extend(names)
    return functions


def test_every_asset_and_check_body_is_thin(asset_functions: dict[Callable, list[str]]) -> None:
    # Reading nothing would pass: the demo's assets must be among what was measured.
    measured = {name for names in asset_functions.values() for name in names}
    assert {"curated_dataset", "latent_shards", "demo_generation", "sbs_report"} <= measured, sorted(measured)
    too_long = sorted(((body_lines(fn), _where(fn), names) for fn, names in asset_functions.items()
                       if body_lines(fn) > MAX_BODY_LINES), key=lambda t: (-t[0], t[1]))
    if too_long:
        pytest.fail(f"{len(too_long)} asset/check bodies over {MAX_BODY_LINES} lines (move the logic into the "
                    "library: read config, call one library function, return metadata):\n"
                    + "\n".join(f"  {n} lines  {where}  ({', '.join(sorted(names)[:4])}"
                                f"{', ...' if len(names) > 4 else ''})" for n, where, names in too_long),
                    pytrace=False)


def checks_without_description(assets_defs: list[dg.AssetsDefinition]) -> list[str]:
    """``asset:check`` names of the asset checks in ``assets_defs`` that have no (or a blank) description."""
    return sorted({f"{spec.asset_key.to_user_string()}:{spec.name}" for assets_def in assets_defs
                   for spec in assets_def.check_specs if not (spec.description or "").strip()})


def test_every_asset_check_has_a_description() -> None:
    from orchestration.definitions import defs

    assets_defs = list(defs.get_repository_def().asset_graph.assets_defs)
    assert any(a.check_specs for a in assets_defs), "no asset checks found in orchestration.definitions.defs"
    missing = checks_without_description(assets_defs)
    if missing:
        pytest.fail(f"{len(missing)} asset checks without a description (the UI shows it beside the result; pass "
                    "description= to @asset_check / AssetCheckSpec):\n" + "\n".join(f"  {m}" for m in missing),
                    pytrace=False)


@dg.asset_check(asset="x", description="described")
def _described() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


@dg.asset_check(asset="x")
def _undescribed() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


@dg.asset(check_specs=[dg.AssetCheckSpec("inline_described", asset="y", description="in the asset"),
                       dg.AssetCheckSpec("inline_blank", asset="y", description="  ")])
def y():  # no return annotation: Dagster would read it as the outputs' types
    yield dg.MaterializeResult()


def test_missing_check_description_decides_both_ways() -> None:
    assert checks_without_description([_described, _undescribed, y]) == ["x:_undescribed", "y:inline_blank"]


def _thin(x: int) -> int:
    """A docstring is not counted.

    Nor are its lines.
    """
    # a comment line counts
    a = x + 1

    b = a * 2  # blank lines above do not count
    return b


def _fat(x: int) -> int:
    total = x
    for i in range(3):
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
        total += i
    return total


@dg.asset(description="decorator lines\nare not counted", group_name="x",
          kinds={"python"})
def _small_asset() -> dg.MaterializeResult:
    """Docstring."""
    return dg.MaterializeResult(metadata={"n": 1})


def test_body_line_count_decides_both_ways() -> None:
    assert body_lines(_thin) == 3
    assert body_lines(_fat) == MAX_BODY_LINES + 1


def test_decorated_asset_is_measured_without_its_decorator() -> None:
    assert body_lines(_small_asset.op.compute_fn.decorated_fn) == 1
