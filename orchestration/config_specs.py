"""Dagster Config classes generated from the project's typed spec dataclasses (``k5model``'s jobs, ``k5data``'s
settings), so a field's type, default and docstring are written once: the spec is the source of truth for the Dagster
launchpad, the ``k5`` CLI and the job itself."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import dagster as dg


def config_from_spec(name: str, spec: type, *, module: str, defaults: Mapping[str, Any],
                     exclude: frozenset[str] = frozenset(),
                     extra: Mapping[str, tuple[Any, str]] | None = None) -> type[dg.Config]:
    """A Dagster Config class with one field per field of the dataclass ``spec`` (its type; its docstring as the
    description) less ``exclude`` (what the asset fills from the lineage), so the spec stays the one source of truth.
    ``defaults`` override the spec's defaults (e.g. demo scale); ``extra`` adds asset-only fields as name ->
    (type, description), their defaults taken from ``defaults``. A required spec field must be excluded or given a
    default; a default naming no field is refused (a typo would silently do nothing)."""
    from pydantic import Field, create_model

    from k5model.training.job import field_docs

    hints, docs, extra = typing.get_type_hints(spec), field_docs(spec), extra or {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name in exclude:
            continue
        if f.name not in docs:
            raise TypeError(f"{spec.__name__}.{f.name} has no docstring to describe its config field")
        default = defaults.get(f.name, f.default)
        if default is dataclasses.MISSING:
            raise TypeError(f"{spec.__name__}.{f.name} is required: exclude it ({name} fills it) or give a default")
        fields[f.name] = (hints[f.name], Field(default, description=docs[f.name]))
    for key, (kind, description) in extra.items():
        if key in fields or key not in defaults:
            raise TypeError(f"{name}.{key}: an extra field needs a default and must not shadow a field of "
                            f"{spec.__name__}")
        fields[key] = (kind, Field(defaults[key], description=description))
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise TypeError(f"{name}: defaults {unknown} name no field of {spec.__name__} (excluded: {sorted(exclude)})")
    return create_model(name, __base__=dg.Config, __module__=module,
                        __doc__=f"Dagster config of {spec.__name__}: {spec.__doc__}", **fields)
