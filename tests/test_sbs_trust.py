"""Issue 20, "judgments you can trust": duplicate and conflicting judgments, empty tables, bad encodings and the
capped invalid-row listing, through the library, ``k5 sbs score`` (in-process and as a real subprocess) and the report
that reads a table or the annotation store. Every rule is shown deciding both ways."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from evaluation.sbs.aggregate import ReportSettings, build_report
from evaluation.sbs.judgments_store import JudgmentsStore
from evaluation.sbs.sbs_plan import Assignment, Plan, PlanItem
from evaluation.sbs.sbs_scores import (
    MAX_LISTED,
    JudgmentsError,
    check_judgments,
    item_scores,
    read_judgments,
    score_judgments,
)
from k5cli.sbs import sbs

REPO = Path(__file__).resolve().parents[1]
HEADER = "item_id,annotator,criterion,choice\n"


def _rows(annotator: str, choice: str, items=("i1", "i2", "i3"), criterion: str = "visual_1") -> str:
    return "".join(f"{i},{annotator},{criterion},{choice}\n" for i in items)


# ann1 and ann2 prefer model 2 on every item, ann3 prefers model 1: per item S1 = 1/3, S2 = 2/3 -> model 2 wins.
CLEAN = HEADER + _rows("ann1", "model2_better") + _rows("ann2", "model2_better") + _rows("ann3", "model1_better")
# The issue's case: the same table holding four copies of ann3's rows. Counted naively, each item has 4 M1 and 2 M2
# votes -> S1 = 2/3, S2 = 1/3: the winner flips with exit 0.
FOUR_COPIES = CLEAN + _rows("ann3", "model1_better") * 3


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _cli(*args: str):
    return CliRunner().invoke(sbs, ["score", *args])


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_four_copies_of_one_annotator_cannot_flip_the_winner(tmp_path: Path) -> None:
    clean = score_judgments(read_judgments(str(_write(tmp_path, "clean.csv", CLEAN))))
    assert clean["overall_visual_quality"]["model1"] == pytest.approx(1 / 3)
    assert clean["overall_visual_quality"]["model2"] == pytest.approx(2 / 3)
    # what scoring without the rule would say (the silent flip of the issue)
    naive = item_scores(read_judgments(str(_write(tmp_path, "naive.csv", FOUR_COPIES))))
    assert naive["s1"].mean() == pytest.approx(2 / 3) and naive["s2"].mean() == pytest.approx(1 / 3)

    path = _write(tmp_path, "four.csv", FOUR_COPIES)
    res = _cli(str(path))  # refused, naming the counts and an example with its lines
    assert res.exit_code != 0 and res.stdout == ""
    err = _one_error_line(res.stderr)
    assert "3 (item_id, annotator, criterion) group(s) repeated with the same choice (9 extra row(s))" in err
    assert "annotator 'ann3'" in err and "lines 8 (model1_better), 11 (model1_better)" in err and "--dedupe" in err

    res = _cli(str(path), "--dedupe")  # one copy kept: exactly the clean table's scores, and said so
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["criteria"] == clean["criteria"] and out["overall_visual_quality"] == clean["overall_visual_quality"]
    assert out["n_judgments"] == 9
    assert out["duplicates"] == {"exact_groups": 3, "exact_rows_dropped": 9, "conflict_groups": 0,
                                 "conflict_rows_dropped": 0, "examples": out["duplicates"]["examples"]}
    assert "dropped 9 extra exact cop(ies) and 0 conflicting row(s), scored 9 judgment(s)" in res.stderr

    res = _cli(str(_write(tmp_path, "clean2.csv", CLEAN)), "--dedupe")  # nothing repeated: nothing dropped
    assert res.exit_code == 0 and "nothing dropped" in res.stderr
    assert json.loads(res.stdout)["criteria"] == clean["criteria"]


def test_conflicting_judgments_are_refused_or_dropped_whole() -> None:
    rows = [("i1", "ann1", "visual_9", "model2_better"), ("i1", "ann2", "visual_9", "model2_better"),
            ("i1", "ann3", "visual_9", "model1_better"), ("i1", "ann3", "visual_9", "model1_better_unconfident"),
            ("i2", "ann1", "visual_9", "equally")]
    df = pd.DataFrame(rows, columns=["item_id", "annotator", "criterion", "choice"])
    with pytest.raises(JudgmentsError, match=r"1 group\(s\) with conflicting choices \(2 row\(s\)\)") as err:
        score_judgments(df)
    assert "lines 4 (model1_better), 5 (model1_better_unconfident)" in str(err.value)
    res = score_judgments(df, dedupe=True)  # neither of ann3's answers can be trusted over the other
    assert res["criteria"]["visual_9"] == {"model1": 0.25, "model2": 0.75}  # i1: M2, M2 -> 0, 1 ; i2: Eq -> .5, .5
    assert res["duplicates"]["conflict_groups"] == 1 and res["duplicates"]["conflict_rows_dropped"] == 2
    # the same annotator on another criterion or item is not a repeat
    ok = pd.concat([df.drop(index=3), pd.DataFrame([("i1", "ann3", "visual_1", "model1_better")],
                                                   columns=df.columns)], ignore_index=True)
    assert score_judgments(ok)["criteria"]["visual_9"]["model1"] == pytest.approx((1 / 3 + 0.5) / 2)
    # a table whose every valid row is a conflicting copy has nothing left to score
    both = df.iloc[2:4]
    with pytest.raises(JudgmentsError, match="every row dropped as a conflicting duplicate"):
        check_judgments(both, dedupe=True)


def test_header_only_and_no_valid_row_are_errors(tmp_path: Path) -> None:
    res = _cli(str(_write(tmp_path, "header.csv", HEADER)))
    assert res.exit_code != 0 and "a header and no judgment rows" in _one_error_line(res.stderr)
    res = _cli(str(_write(tmp_path, "empty.csv", "")))
    assert res.exit_code != 0 and "empty file" in _one_error_line(res.stderr)
    bad = HEADER + "i1,ann1,visual_1,both_correct\ni1,ann1,visual_99,equally\n"
    res = _cli(str(_write(tmp_path, "bad.csv", bad)))
    err = _one_error_line(res.stderr)
    assert res.exit_code != 0 and "all 2 row(s) invalid" in err
    assert "line 2: choice 'both_correct' not allowed for visual_1" in err and "line 3: unknown criterion" in err
    # one valid row is enough
    res = _cli(str(_write(tmp_path, "one.csv", bad + "i1,ann1,visual_1,equally\n")))
    assert res.exit_code == 0 and json.loads(res.stdout)["invalid_rows"] == [2, 3]
    # Parquet with a schema and no rows: the same rule
    pq = tmp_path / "header.parquet"
    pd.DataFrame(columns=["item_id", "annotator", "criterion", "choice"], dtype=str).to_parquet(pq)
    assert _cli(str(pq)).exit_code != 0


def test_header_only_as_a_real_subprocess(tmp_path: Path) -> None:
    path = _write(tmp_path, "header.csv", HEADER)
    proc = subprocess.run([sys.executable, "-m", "k5cli.sbs", "score", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "no judgment rows" in _one_error_line(proc.stderr)


def test_bad_encodings_name_the_line_and_the_likely_cause(tmp_path: Path) -> None:
    text = HEADER + "i1,ann1,visual_1,equally\ni2,José,visual_1,model1_better\n"
    res = _cli(str(_write(tmp_path, "latin.csv", text.encode("cp1252"))))
    err = _one_error_line(res.stderr)
    assert res.exit_code != 0 and "line 3 is not UTF-8 (byte 0xe9" in err and "Windows-1252" in err
    assert "'i2,José,visual_1,model1_better'" in err  # what the line would read as, to find it
    res = _cli(str(_write(tmp_path, "utf16.csv", text.encode("utf-16"))))
    assert res.exit_code != 0 and "NUL bytes" in _one_error_line(res.stderr) and "UTF-16" in res.stderr
    parquet = _write(tmp_path, "fake.parquet", text)
    res = _cli(str(parquet))
    assert res.exit_code != 0 and "not a readable Parquet file" in _one_error_line(res.stderr)
    # the same content in UTF-8, with or without a byte-order mark, scores
    for name, data in (("utf8.csv", text.encode("utf-8")), ("bom.csv", text.encode("utf-8-sig"))):
        res = _cli(str(_write(tmp_path, name, data)))
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["criteria"]["visual_1"] == {"model1": 0.75, "model2": 0.25}


def test_invalid_listing_is_capped(tmp_path: Path) -> None:
    n_bad = MAX_LISTED + 5
    text = HEADER + "".join(f"i{k},ann1,visual_1,bogus\n" for k in range(n_bad)) + "i0,ann2,visual_1,equally\n"
    res = _cli(str(_write(tmp_path, "many.csv", text)))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["invalid_rows"] == list(range(2, 2 + MAX_LISTED)) and out["n_invalid_rows"] == n_bad
    assert f"warning: {n_bad} invalid row(s) excluded: line 2: choice 'bogus' not allowed for visual_1" in res.stderr
    assert "; ... and 5 more" in res.stderr and f"line {MAX_LISTED + 2}:" not in res.stderr
    res = _cli(str(_write(tmp_path, "few.csv", HEADER + "i1,ann1,visual_1,bogus\ni1,ann2,visual_1,equally\n")))
    assert res.exit_code == 0 and "more" not in res.stderr and json.loads(res.stdout)["n_invalid_rows"] == 1


def _batch(root: Path) -> tuple[Path, Plan]:
    items = [PlanItem(i, "a cat", f"{i}_a.mp4", f"{i}_b.mp4") for i in ("i1", "i2", "i3")]
    plan = Plan(items, [Assignment(a, i.item_id, True, n) for a in ("ann1", "ann2", "ann3")
                        for n, i in enumerate(items)], overlap=3, seed=0,
                meta={"comparison": "x_vs_y", "model_a": "x", "model_b": "y"})
    root.mkdir(parents=True)
    (root / "plan.json").write_text(plan.to_json())
    return root, plan


def test_report_applies_the_same_rule_to_tables_and_the_store(tmp_path: Path) -> None:
    root, plan = _batch(tmp_path / "batch")
    four = _write(tmp_path, "four.csv", FOUR_COPIES)
    with pytest.raises(JudgmentsError, match="repeated with the same choice"):
        build_report(root, ReportSettings(judgments_path=str(four), n_boot=20), log=lambda _: None)
    with pytest.raises(JudgmentsError, match="a header and no judgment rows"):
        build_report(root, ReportSettings(judgments_path=str(_write(tmp_path, "h.csv", HEADER)), n_boot=20))
    table = build_report(root, ReportSettings(judgments_path=str(_write(tmp_path, "c.csv", CLEAN)), n_boot=20),
                         log=lambda _: None)
    assert table.summary["overall_visual_quality"]["model2"] == pytest.approx(2 / 3)
    # the store holds each key once by construction (primary key); judged the same way it scores the same
    with JudgmentsStore(root / "judgments.duckdb") as store:
        store.load_plan(plan)
        for row in pd.read_csv(_write(tmp_path, "c2.csv", CLEAN)).itertuples(index=False):
            store.record(row.annotator, row.item_id, row.criterion, row.choice)
    logged: list[str] = []
    stored = build_report(root, ReportSettings(n_boot=20), log=logged.append)
    assert stored.summary["criteria"] == table.summary["criteria"] and stored.summary["n_invalid_rows"] == 0
    assert stored.summary["n_judgments"] == 9 and not logged
