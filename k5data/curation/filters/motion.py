"""Camera and object motion from dense optical flow (OpenCV Farneback) between the 2 FPS dynamics frames.

Camera motion = magnitude of the median flow vector (the global shift), object motion = mean magnitude of the
flow left after removing it; both in fractions of the frame diagonal per second. The report's production model
is a VideoMAE regressor (§4.4) predicting camera movement, object movement and light/colour dynamics: backend
``videomae`` runs such a model (``HFVideoRegressor``, outputs ``camera``, ``object``, ``light``) over the scene's
sampled frames, with thresholds on its scale; these flow scores are the offline default ("farneback-median-v1",
no light term)."""

from __future__ import annotations

from typing import Any

import numpy as np

from k5data.curation.filters import Item, gray, resize_short, result


def flow_motion(frames: list[np.ndarray], dt: float, side: int) -> tuple[float, float]:
    import cv2

    small = [gray(resize_short(f, side)) for f in frames]
    diag = float(np.hypot(*small[0].shape))
    camera, objects = [], []
    for a, b in zip(small[:-1], small[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        median = np.median(flow.reshape(-1, 2), axis=0)
        camera.append(float(np.hypot(*median)))
        objects.append(float(np.linalg.norm(flow - median, axis=2).mean()))
    scale = 1.0 / (diag * dt)
    return float(np.mean(camera) * scale), float(np.mean(objects) * scale)


def _decide(cfg: dict[str, Any], camera: float, objects: float, light: float | None) -> tuple[bool, str | None]:
    if cfg.get("max_camera") is not None and camera > cfg["max_camera"]:
        return False, "camera_motion"
    if cfg.get("min_object") is not None and objects < cfg["min_object"]:
        return False, "no_object_motion"
    if light is not None and cfg.get("max_light") is not None and light > cfg["max_light"]:
        return False, "light_change"
    return True, None


def score_motion(item: Item, cfg: dict[str, Any], model: Any = None) -> dict[str, Any]:
    backend = model.name if cfg["backend"] == "videomae" else "farneback-median-v1"
    if cfg["backend"] not in ("farneback", "videomae"):
        raise ValueError(f"unknown motion backend {cfg['backend']!r} (farneback | videomae)")
    if item.kind != "video":
        return result("motion", None, "n/a-image", True, camera_motion=None, object_motion=None, light_motion=None)
    frames = item.get(item.dyn)
    if len(frames) < 2:
        return result("motion", None, backend, True, camera_motion=None, object_motion=None, light_motion=None)
    if cfg["backend"] == "videomae":
        out = model.scores(frames)
        camera, objects, light = out["camera"], out["object"], out.get("light")
    else:
        dt = (item.dyn[1] - item.dyn[0]) / (item.fps or 1.0)
        (camera, objects), light = flow_motion(frames, dt, cfg["side"]), None
    ok, reason = _decide(cfg, camera, objects, light)
    return result("motion", camera + objects, backend, ok, reason, camera_motion=camera, object_motion=objects,
                  light_motion=light)
