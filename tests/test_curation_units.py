"""Unit tests of the curation building blocks on fixed inputs (no corpus run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from k5data.curation.captions import parse_sidecar, postprocess_caption
from k5data.curation.catalog import Catalog
from k5data.curation.config import load_config
from k5data.curation.domains import CATEGORIES, CATEGORY_LIST, keyword_domain, kmeans_clusters, parse_domain, prompt_for
from k5data.curation.filters.dedup import find_duplicates, hamming, phash
from k5data.curation.filters.dynamics import ms_ssim
from k5data.curation.filters.resolution import bucket_of
from k5data.curation.probe import ProbeError, probe_file, sniff
from k5data.curation.scenes import apply_length_rule
from k5data.sources import shard_of

IMG, VID = [".jpg", ".png"], [".mp4"]


@pytest.mark.parametrize("raw, clean", [
    ("The image shows a cat on a sofa.", "A cat on a sofa."),
    ("The video starts with a man walking a dog. He waves.", "A man walking a dog. He waves."),
    ("This photo depicts: a red car.", "A red car."),
    # English and Russian sentences are kept (grouped by language), other scripts dropped as OCR noise
    ("In the image, a boy. Мальчик играет. 男孩在玩。 He laughs.", "In the image, a boy. He laughs. Мальчик играет."),
    ("A tabby cat. The image shows a sofa.", "A tabby cat. The image shows a sofa."),  # only the intro phrase
    ("Кошка на диване.", "Кошка на диване."),
    ("男孩在玩。", ""),
    ("Café au lait on a table.", "Café au lait on a table."),  # accented Latin is Latin
])
def test_caption_postprocessing(raw: str, clean: str) -> None:
    assert postprocess_caption(raw) == clean


def test_sidecar_per_scene_and_whole() -> None:
    assert parse_sidecar("[scene 0] a road\n[scene 2] a bike\n") == {0: "a road", 2: "a bike"}
    assert parse_sidecar("one caption\nfor all\n") == {None: "one caption for all"}


def test_domain_prompt_and_parsing() -> None:
    assert CATEGORIES == ["animals", "architecture", "art", "cartoons", "food", "interiors", "nature", "people",
                          "tech", "other"]
    prompt = prompt_for("video")
    assert prompt.startswith("You are a professional video classificator. You are given a video.")
    assert CATEGORY_LIST.strip() in prompt and prompt.endswith("Return only the name of class.")
    assert parse_domain("Food.") == "food" and parse_domain("7) nature") == "nature"
    assert parse_domain("garbage tokens") == "other"
    assert keyword_domain("A tabby cat on a sofa.") == "animals" and keyword_domain("Abstract shapes.") == "other"


def test_length_rule_cuts_long_and_flags_short_shots() -> None:
    scenes = apply_length_rule([(0, 25), (25, 75), (75, 3076)], fps=25.0, min_s=2.0, max_s=60.0)
    assert [s.reason for s in scenes[:2]] == ["scene_too_short", None]  # 1 s short; 2 s exactly is allowed
    long_parts = scenes[2:]
    assert len(long_parts) == 3 and all(s.duration <= 60.0 for s in long_parts)  # 120.04 s -> 3 pieces
    assert long_parts[0].start_frame == 75 and long_parts[-1].end_frame == 3076
    assert scenes[1].even(3) == [33, 50, 66] and scenes[1].at_fps(2.0)[:3] == [25, 37, 49]


def test_probe_reasons(tmp_path: Path) -> None:
    from PIL import Image

    good = tmp_path / "a.png"
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(good)
    info = probe_file(good, "a.png", good.stat().st_size, IMG, VID)
    assert (info.kind, info.width, info.height, info.codec) == ("image", 400, 300, "png")
    cases = {"b.jpg": good.read_bytes(), "c.png": good.read_bytes()[:200], "d.png": b"",
             "e.png": b"hello world, not an image", "f.gif": b"GIF89a..."}
    reasons = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ProbeError) as err:
            probe_file(tmp_path / name, name, len(data), IMG, VID)
        reasons[name] = str(err.value)
    assert reasons["b.jpg"] == "mislabelled file: extension '.jpg' but the content is png"
    assert reasons["c.png"].startswith("truncated or corrupt png image")
    assert reasons["d.png"] == "empty file (0 bytes)"
    assert reasons["e.png"] == "unrecognised content: '.png' file is not a valid png file"
    assert reasons["f.gif"] == "unsupported file type '.gif'"
    assert sniff(b"\x00\x00\x00\x18ftypmp42") == "isobmff"


def test_phash_and_duplicates() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random((64, 64, 3)) * 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
    noisy = np.clip(base.astype(int) + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
    other = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
    assert hamming(phash(base), phash(noisy)) <= 6 and hamming(phash(base), phash(other)) > 16
    rows = [dict(kind="image", hash=[phash(f)], width=w, height=w, size=s, media_id=m, quality_technical=0.5)
            for f, w, s, m in [(noisy, 256, 10, "n"), (base, 512, 10, "b"), (other, 512, 10, "o")]]
    assert find_duplicates(rows, image_radius=10, video_radius=12) == {0: 1}  # larger copy kept


def test_msssim_extremes() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random((256, 256)) * 255).astype(np.uint8)
    b = (rng.random((256, 256)) * 255).astype(np.uint8)
    assert ms_ssim(a, a) == pytest.approx(1.0)
    assert ms_ssim(a, b) < 0.2


def test_buckets_shards_clusters_config(tmp_path: Path) -> None:
    assert [bucket_of(s, [256, 512, 1024]) for s in (100, 256, 511, 720, 2000)] == [0, 256, 256, 512, 1024]
    assert shard_of("a/b.png", 4) == shard_of("a/b.png", 4) and {shard_of(f"{i}.png", 4) for i in range(40)} == {
        0, 1, 2, 3}
    emb = np.concatenate([np.zeros((5, 3)), np.ones((5, 3))]) + np.linspace(0, 0.01, 10)[:, None]
    labels, _ = kmeans_clusters(emb, k=2, seed=0)
    assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1 and labels[0] != labels[-1]
    labels, _ = kmeans_clusters(emb[:3], k=10_000, seed=0)  # k capped at the rows available
    assert sorted(labels) == [0, 1, 2]
    override = tmp_path / "c.yaml"
    override.write_text("filters:\n  resolution:\n    min_short_side: 512\nclusters:\n  k: 10000\n")
    cfg = load_config(override)
    assert cfg.section("filters.resolution")["min_short_side"] == 512 and cfg.section("clusters")["k"] == 10000
    assert cfg.section("filters.dedup")["image_radius"] == 10  # untouched defaults survive the merge
    with pytest.raises(KeyError):
        cfg.section("filters.nope")


def test_catalog_registration_is_idempotent(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.duckdb")
    info = dict(kind="image", format="png", codec="png", width=10, height=10, fps=None, duration=None, n_frames=1)
    where = dict(source="s", key="a.png", shard=0, size=5, version="1")
    assert cat.register("h1", info, uri="file:///a.png", **where) is True
    assert cat.register("h1", info, uri="file:///copy.png", **{**where, "key": "copy.png"}) is False
    cat.quarantine(uri="file:///bad.png", reason="empty file (0 bytes)", **{**where, "key": "bad.png"})
    assert cat.known_versions("s") == {"file:///a.png": "1", "file:///copy.png": "1", "file:///bad.png": "1"}
    assert cat.counts() == {"media": 1, "locations": 2, "quarantine": 1, "items": 0}
    assert [m["media_id"] for m in cat.unscored("s")] == ["h1"]


def test_rerun_registers_only_new_files(tmp_path: Path) -> None:
    import shutil

    from k5data.curation.corpus import skimage_dir
    from k5data.curation.curate import run_curation

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in ["camera.png", "coins.png"]:
        shutil.copyfile(skimage_dir() / name, src / name)
    (src / "camera.txt").write_text("A man with a camera on a tripod.\n")  # a source with no sidecar at all is refused
    first = run_curation(str(src), str(out), progress=False)
    shutil.copyfile(skimage_dir() / "moon.png", src / "moon.png")
    shutil.copyfile(src / "camera.png", src / "camera_copy.png")  # byte copy: a new location, not new media
    second = run_curation(str(src), str(out), progress=False)
    assert first.register["new_media"] == 2
    assert (second.register["new_media"], second.register["new_copies"], second.register["unchanged"]) == (1, 1, 2)
    assert second.scored_media == 1 and second.dataset["rows"] == 3
    # No sidecar and no VLM configured: rows are kept but rejected for the missing caption (coins, moon).
    assert second.dataset["reject_reasons"].get("no_caption") == 2


def _dataset_rows(**changes: list) -> Any:
    import pandas as pd

    rows = {"media_id": ["a", "b", "c"], "scene_index": [0, 0, 0], "kind": ["image"] * 3,
            "phash": ["01", "02", "03"], "caption": ["A cat.", "A dog.", "A car."], "width": [300, 600, 1200],
            "height": [256, 512, 1024], "bucket": [256, 512, 1024], "passed": [True, True, True]}
    rows.update(changes)
    return pd.DataFrame(rows).astype({"passed": "boolean"})


def test_dataset_checks_decide_both_ways() -> None:
    from k5data.curation.checks import bucket_sanity, duplicate_hashes, uncaptioned_rows

    good = _dataset_rows()
    assert duplicate_hashes(good).passed and uncaptioned_rows(good).passed
    assert bucket_sanity(good, [256, 512, 1024]).metadata == {
        "bucket_counts": {"256": 1, "512": 1, "1024": 1}, "invalid_bucket": 0, "bucket_above_short_side": 0}
    assert bucket_sanity(good, [256, 512, 1024]).passed

    same_hash = duplicate_hashes(_dataset_rows(phash=["01", "01", "03"]))
    assert not same_hash.passed and same_hash.metadata["duplicate_phashes"] == 1
    same_id = duplicate_hashes(_dataset_rows(media_id=["a", "a", "c"]))
    assert not same_id.passed and same_id.metadata["duplicate_ids"] == 1
    # a rejected duplicate is what dedup is for: only passed rows count
    assert duplicate_hashes(_dataset_rows(phash=["01", "01", "03"], passed=[True, False, True])).passed

    blank = uncaptioned_rows(_dataset_rows(caption=["A cat.", "  ", None]))
    assert not blank.passed and blank.metadata["uncaptioned"] == 2
    assert uncaptioned_rows(_dataset_rows(caption=["A cat.", "A dog.", ""], passed=[True, True, False])).passed

    assert not bucket_sanity(good, [256, 512]).passed  # 1024 not allowed
    above = bucket_sanity(_dataset_rows(height=[256, 400, 1024]), [256, 512, 1024])
    assert not above.passed and above.metadata["bucket_above_short_side"] == 1
    empty = bucket_sanity(_dataset_rows(passed=[False, False, False]), [256, 512, 1024])
    assert not empty.passed and empty.metadata["bucket_counts"] == {}
