"""Prompt-set loaders: MovieGen Video Bench (video) and PartiPrompts (image).

The files are not vendored in the repo: they live in ``shared/prompts`` beside the checkout (CI clones the repo next
to ``shared/``), or wherever ``$K5_PROMPTS_DIR`` points.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MOVIEGEN_FILE = Path("moviegen") / "MovieGenVideoBenchWithTag.csv"
PARTI_FILE = Path("parti") / "PartiPrompts.tsv"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``id`` is stable within its set (``<set>-<row index, 0-based>``); ``tags`` holds the set's
    annotation columns (MovieGen: concept, motion_level; Parti: category, challenge, note)."""

    id: str
    prompt: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)


def prompts_dir() -> Path:
    """``$K5_PROMPTS_DIR`` if set, else ``<repo>/../shared/prompts``. Raises FileNotFoundError if it is missing."""
    env = os.environ.get("K5_PROMPTS_DIR")
    path = Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared" / "prompts").resolve()
    if not path.is_dir():
        how = "K5_PROMPTS_DIR" if env else "the default <repo>/../shared/prompts (set K5_PROMPTS_DIR to override)"
        raise FileNotFoundError(f"prompts directory {path} does not exist (from {how})")
    return path


def _file(rel: Path) -> Path:
    path = prompts_dir() / rel
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    return path


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")


def load_moviegen(limit: int | None = None) -> list[PromptRecord]:
    """MovieGen Video Bench prompts in file order (1003 in the full set); ``limit`` keeps the first N."""
    _check_limit(limit)
    path = _file(MOVIEGEN_FILE)
    out: list[PromptRecord] = []
    # newline="" because some CSV fields are quoted and may span lines.
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a 'prompt' column, got header {reader.fieldnames}")
        for i, row in enumerate(reader):
            if limit is not None and len(out) >= limit:
                break
            text = (row.get("prompt") or "").strip()
            if not text:
                raise ValueError(f"{path}: empty prompt in data row {i}")
            tags = {k: (v or "").strip() for k, v in row.items() if k and k != "prompt"}
            out.append(PromptRecord(id=f"moviegen-{i:04d}", prompt=text, source="moviegen", tags=tags))
    return out


def load_parti(limit: int | None = None) -> list[PromptRecord]:
    """PartiPrompts in file order (1632 in the full set); ``limit`` keeps the first N."""
    _check_limit(limit)
    path = _file(PARTI_FILE)
    out: list[PromptRecord] = []
    # QUOTE_NONE: the TSV is not quoted, and prompts such as '"G I G G L E" painted ...' start with a literal quote.
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if reader.fieldnames is None or "Prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a 'Prompt' column, got header {reader.fieldnames}")
        for i, row in enumerate(reader):
            if limit is not None and len(out) >= limit:
                break
            text = (row.get("Prompt") or "").strip()
            if not text:
                raise ValueError(f"{path}: empty prompt in data row {i}")
            tags = {k.lower(): (v or "").strip() for k, v in row.items() if k and k != "Prompt"}
            out.append(PromptRecord(id=f"parti-{i:04d}", prompt=text, source="parti", tags=tags))
    return out
