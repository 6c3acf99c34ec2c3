"""bench/curation_throughput.py in its CPU smoke mode: every filter (heuristics, the model backends as tiny random
twins, and the Qwen2.5-VL paths from the tiny VLM folder) is timed through its library function and reported with
a positive images/s and clip-seconds/s in the JSON. The production-size CPU figures and the GPU run are in
docs/benchmarks.md; this only keeps the benchmark runnable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_curation_models import tiny_vlm  # noqa: F401  (module-scoped fixture: the tiny Qwen2.5-VL folder)

from bench.curation_throughput import VIDEO_ONLY, main


@pytest.mark.slow  # ~15 s of CPU: every filter and model backend is built and timed once
def test_curation_throughput_smoke(tmp_path: Path, tiny_vlm: Path) -> None:  # noqa: F811
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--vlm", str(tiny_vlm), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model_size"] == "tiny" and result["device"].startswith("cpu")
    filters = result["filters"]
    for name in ["text_area_rapidocr", "watermark_classifier", "watermark_detector", "quality_video_regressor",
                 "complexity_sam2_sobel", "motion_videomae", "objects_detector", "scene_clip_zero_shot",
                 "caption_qwen2_5_vl", "qalign_qwen2_5_vl", "dynamics_msssim"]:
        assert filters[name]["clip_seconds_per_s"] > 0
        assert (name in VIDEO_ONLY) == ("images_per_s" not in filters[name])
