"""Prompt-set loaders against the real shared files and against small files via K5_PROMPTS_DIR."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from evaluation.prompts import PromptRecord, load_moviegen, load_parti, prompts_dir

REPO = Path(__file__).resolve().parents[1]


def test_default_prompts_dir_is_beside_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("K5_PROMPTS_DIR", raising=False)
    assert prompts_dir() == (REPO.parent / "shared" / "prompts").resolve()


def test_moviegen_full_set_matches_the_csv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("K5_PROMPTS_DIR", raising=False)
    with (prompts_dir() / "moviegen" / "MovieGenVideoBenchWithTag.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    records = load_moviegen()
    assert len(records) == len(rows) == 1003
    assert [r.prompt for r in records] == [row["prompt"].strip() for row in rows]
    first = records[0]
    assert first.id == "moviegen-0000" and first.source == "moviegen"
    assert first.prompt.startswith("A stylish woman walks down a Tokyo street")
    assert first.tags == {"concept": "human - activity", "motion_level": "low"}
    assert len({r.id for r in records}) == len(records)


def test_moviegen_limit() -> None:
    two = load_moviegen(limit=2)
    assert [r.id for r in two] == ["moviegen-0000", "moviegen-0001"]
    assert two == load_moviegen()[:2]
    assert load_moviegen(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        load_moviegen(limit=-1)


def test_parti_full_set_keeps_literal_quotes() -> None:
    records = load_parti()
    assert len(records) == 1632
    assert records[0] == PromptRecord(
        id="parti-0000", prompt="bond", source="parti",
        tags={"category": "Abstract", "challenge": "Basic", "note": "Biology-inspired concepts with multiple meanings"},
    )
    # A prompt that begins with a quote must come through verbatim (a quoting CSV reader would eat the quotes).
    giggle = [r for r in records if "G I G G L E" in r.prompt]
    assert len(giggle) == 1 and giggle[0].prompt.startswith('"G I G G L E" painted')
    assert all("\t" not in r.prompt for r in records)
    assert [r.id for r in load_parti(limit=3)] == ["parti-0000", "parti-0001", "parti-0002"]


def test_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "moviegen").mkdir()
    (tmp_path / "parti").mkdir()
    (tmp_path / "moviegen" / "MovieGenVideoBenchWithTag.csv").write_text(
        'prompt,concept,motion_level\n"A dog, running\non grass",animals,high\nA cat,animals,low\n', encoding="utf-8"
    )
    (tmp_path / "parti" / "PartiPrompts.tsv").write_text(
        "Prompt\tCategory\tChallenge\tNote\n\"Hi\" sign\tArts\tBasic\t\n", encoding="utf-8"
    )
    monkeypatch.setenv("K5_PROMPTS_DIR", str(tmp_path))
    assert prompts_dir() == tmp_path.resolve()
    mg = load_moviegen()
    assert [r.prompt for r in mg] == ["A dog, running\non grass", "A cat"]
    assert mg[0].tags == {"concept": "animals", "motion_level": "high"}
    assert load_parti() == [PromptRecord("parti-0000", '"Hi" sign', "parti",
                                         {"category": "Arts", "challenge": "Basic", "note": ""})]


def test_missing_dir_and_file_errors_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    monkeypatch.setenv("K5_PROMPTS_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)) as err:
        load_moviegen()
    assert "K5_PROMPTS_DIR" in str(err.value)
    monkeypatch.setenv("K5_PROMPTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PartiPrompts.tsv"):
        load_parti()


def test_bad_header_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "moviegen").mkdir()
    (tmp_path / "moviegen" / "MovieGenVideoBenchWithTag.csv").write_text("text\nhello\n", encoding="utf-8")
    monkeypatch.setenv("K5_PROMPTS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="'prompt' column"):
        load_moviegen()
