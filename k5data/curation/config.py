"""Curation configuration: thresholds and backends come from YAML (``configs/curation.yaml``), never from code."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from k5data.object_store import RetryPolicy

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "curation.yaml"
PRODUCTION_CONFIG = Path(__file__).with_name("configs") / "production.yaml"
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_vars(node: Any) -> Any:
    """``${NAME}`` / ``${NAME:-default}`` in string values, from the environment (model folders under
    ``$K5_MODELS``); an unset variable without a default is an error naming it."""
    if isinstance(node, dict):
        return {k: expand_vars(v) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_vars(v) for v in node]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value(m: re.Match) -> str:
        if m.group(1) in os.environ:
            return os.environ[m.group(1)]
        if m.group(2) is None:
            raise KeyError(f"curation config uses ${{{m.group(1)}}}, which is not set; export it or write "
                           f"${{{m.group(1)}:-default}}")
        return m.group(2)

    return _VAR.sub(value, node)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class CurationConfig(dict):
    """The parsed YAML as a dict, plus ``cfg.section("filters.dedup")`` lookups that fail loudly on typos."""

    def section(self, dotted: str) -> dict[str, Any]:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"curation config has no '{dotted}' (missing '{part}')")
            node = node[part]
        return node

    @property
    def endpoint_url(self) -> str | None:
        # Config wins; the env var lets a deployment point at its store without editing the file.
        return self.section("s3").get("endpoint_url") or os.environ.get("K5_S3_ENDPOINT_URL") or None

    @property
    def retry_policy(self) -> RetryPolicy:
        """How store and file operations of curation retry transient errors (``s3.retries``)."""
        from k5data.object_store import RetryPolicy

        return RetryPolicy(**self.section("s3").get("retries", {}))


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> CurationConfig:
    """Load the default config, then the YAML at ``path`` merged over it, then ``overrides`` (nested dict)."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if path is not None:
        data = _merge(data, yaml.safe_load(Path(path).read_text()) or {})
    if overrides:
        data = _merge(data, overrides)
    return CurationConfig(expand_vars(data))
