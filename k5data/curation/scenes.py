"""Video scene segmentation with PySceneDetect and the report's 2..60 s scene rule (§4.4), plus frame sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from k5data.curation.filters import resize_long
from k5data.curation.probe import ProbeError


@dataclass
class Scene:
    index: int
    start_frame: int
    end_frame: int          # exclusive
    fps: float
    reason: str | None = None   # "scene_too_short" when the shot is under min_s
    frames: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def start_s(self) -> float:
        return self.start_frame / self.fps

    @property
    def end_s(self) -> float:
        return self.end_frame / self.fps

    @property
    def duration(self) -> float:
        return (self.end_frame - self.start_frame) / self.fps

    def even(self, n: int) -> list[int]:
        """``n`` evenly spaced frame indices (centres of n equal parts) inside the scene."""
        length = self.end_frame - self.start_frame
        return sorted({self.start_frame + int((i + 0.5) * length / n) for i in range(n)})

    def at_fps(self, fps: float) -> list[int]:
        """Frame indices sampled at ``fps`` (e.g. 2 FPS for MS-SSIM), at least two when the scene allows."""
        step = max(1, round(self.fps / fps))
        idx = list(range(self.start_frame, self.end_frame, step))
        if len(idx) < 2 and self.end_frame - 1 > self.start_frame:
            idx = [self.start_frame, self.end_frame - 1]
        return idx


def detect_shots(path: str | Path, detector: str = "adaptive") -> tuple[list[tuple[int, int]], float, int]:
    """Shot boundaries [(start, end_exclusive)] in frames, the fps and the frame count (one shot if no cut)."""
    from scenedetect import AdaptiveDetector, ContentDetector, SceneManager, open_video

    video = open_video(str(path), backend="pyav")
    manager = SceneManager()
    manager.add_detector(AdaptiveDetector() if detector == "adaptive" else ContentDetector())
    manager.detect_scenes(video, show_progress=False)
    fps = float(video.frame_rate)
    total = int(video.frame_number)
    shots = [(a.get_frames(), b.get_frames()) for a, b in manager.get_scene_list()]
    if not shots and total > 0:
        shots = [(0, total)]
    return shots, fps, total


def apply_length_rule(shots: list[tuple[int, int]], fps: float, min_s: float, max_s: float) -> list[Scene]:
    """Shots longer than ``max_s`` are cut into equal pieces of at most ``max_s``; shots shorter than ``min_s``
    stay as rows (so every detected shot is accounted for) but carry ``scene_too_short``."""
    scenes: list[Scene] = []
    tolerance = 0.5 / fps  # frame-rounded boundaries: a 50-frame shot at 25 fps is exactly 2 s
    for start, end in shots:
        length = (end - start) / fps
        pieces = max(1, int(np.ceil(length / max_s - 1e-9)))
        bounds = np.linspace(start, end, pieces + 1).round().astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):
            reason = "scene_too_short" if (b - a) / fps + tolerance < min_s else None
            scenes.append(Scene(len(scenes), int(a), int(b), fps, reason))
    return scenes


def segment(path: str | Path, detector: str, min_s: float, max_s: float,
            expected_frames: int | None = None) -> list[Scene]:
    """Scenes of a clip. With ``expected_frames`` (the probe's count), a decoder that stops early is an error, not
    a shorter clip: PySceneDetect gives up quietly after a run of undecodable frames."""
    shots, fps, total = detect_shots(path, detector)
    if expected_frames and total < 0.98 * expected_frames:
        raise ProbeError(f"corrupt video: scene detection decoded only {total} of {expected_frames} frames")
    return apply_length_rule(shots, fps, min_s, max_s)


def decode_frames(path: str | Path, wanted: set[int], max_side: int) -> dict[int, np.ndarray]:
    """Decode the video once, front to back, keeping the RGB frames whose index is in ``wanted``."""
    import av

    out: dict[int, np.ndarray] = {}
    if not wanted:
        return out
    last = max(wanted)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                out[i] = resize_long(frame.to_ndarray(format="rgb24"), max_side)  # scores use a bounded size
            if i >= last:
                break
    if len(out) < len(wanted):
        raise ProbeError(f"corrupt video: decoding stopped before frame {max(set(wanted) - set(out))} "
                         f"({len(out)} of {len(wanted)} sampled frames decoded)")
    return out
