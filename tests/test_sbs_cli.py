"""``k5 sbs score`` on real CSV and Parquet files, in-process (click) and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from k5cli.sbs import sbs

REPO = Path(__file__).resolve().parents[1]

CSV = """item_id,annotator,criterion,choice
p1,ann1,visual_1,model1_better
p1,ann2,visual_1,equally
p1,ann3,visual_1,model2_better_unconfident
p2,ann1,visual_1,model2_better
p1,ann1,visual_10,both_correct
p1,ann2,visual_10,bogus_choice
p1,ann1,visual_6,model1_better_unconfident
p1,ann1,pf_object_presence,both_incorrect
p1,ann2,pf_object_presence,both_correct
p1,ann3,pf_color,model1_better
p1,ann1,visual_8,not_applicable
"""
# Hand-worked:
#   visual_1  p1: M1 1/3, Eq 1/3, M2u 1/3 -> S1 = 1/3 + 1/6 = .5, S2 = 1/6 + 1/6 = 1/3 ; p2: M2 -> 0, 1
#             mean: S1 = .25, S2 = 2/3
#   visual_10 p1: BC (line 7 bogus excluded) -> 1, 1
#   visual_6  p1: M1u -> .5, 0
#   pf_object_presence p1: BI .5, BC .5 -> .5, .5
#   overall_visual_quality = mean(visual_1, visual_10) = (.625, 5/6)
#   overall_motion = visual_6 (visual_8 n/a only) = (.5, 0)
#   invalid: line 7 (choice), line 11 (unknown criterion)


def check(result: dict) -> None:
    c = result["criteria"]
    assert c["visual_1"]["model1"] == pytest.approx(0.25) and c["visual_1"]["model2"] == pytest.approx(2 / 3)
    assert c["visual_10"] == {"model1": 1.0, "model2": 1.0}
    assert c["visual_6"] == {"model1": 0.5, "model2": 0.0}
    assert c["pf_object_presence"] == {"model1": 0.5, "model2": 0.5}
    assert "visual_8" not in c
    assert result["overall_visual_quality"]["model1"] == pytest.approx(0.625)
    assert result["overall_visual_quality"]["model2"] == pytest.approx(5 / 6)
    assert result["overall_motion"] == {"model1": 0.5, "model2": 0.0}
    assert result["overall_prompt_following"] == {"model1": 0.5, "model2": 0.5}
    assert result["invalid_rows"] == [7, 11]


def test_score_csv_in_process(tmp_path: Path) -> None:
    path = tmp_path / "judgments.csv"
    path.write_text(CSV)
    out = tmp_path / "scores.json"
    res = CliRunner().invoke(sbs, ["score", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    check(json.loads(res.stdout))
    check(json.loads(out.read_text()))
    assert "2 invalid row(s)" in res.stderr


def test_score_parquet_as_subprocess(tmp_path: Path) -> None:
    csv = tmp_path / "j.csv"
    csv.write_text(CSV)
    pq = tmp_path / "j.parquet"
    pd.read_csv(csv, dtype=str).to_parquet(pq)
    proc = subprocess.run([sys.executable, "-m", "k5cli.sbs", "score", str(pq)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check(json.loads(proc.stdout))


def test_missing_columns_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("item,annotator,criterion,choice\np1,a,visual_1,equally\n")
    res = CliRunner().invoke(sbs, ["score", str(path)])
    assert res.exit_code != 0 and "missing columns" in res.output
