"""Per-media scoring: segment videos into scenes, decode the sampled frames once, run every filter, caption,
classify the domain and embed. Results are stored per row (image or scene) in the catalog."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from k5data.curation.backends import (
    ClipEmbedder,
    ClipZeroShot,
    HFImageClassifier,
    HFObjectDetector,
    HFVideoRegressor,
    Sam2Counter,
    cached,
)
from k5data.curation.captions import Captioner, parse_sidecar, sidecar_key
from k5data.curation.catalog import Catalog
from k5data.curation.classes import SCENE_KEYS, classify
from k5data.curation.config import CurationConfig
from k5data.curation.domains import DomainClassifier, thumbnail_embedding
from k5data.curation.filters import Item, resize_long
from k5data.curation.filters.complexity import score_complexity
from k5data.curation.filters.dedup import video_hash
from k5data.curation.filters.dynamics import score_dynamics
from k5data.curation.filters.motion import score_motion
from k5data.curation.filters.quality import score_quality
from k5data.curation.filters.resolution import score_resolution
from k5data.curation.filters.text_area import score_text_area
from k5data.curation.filters.watermark import score_watermark
from k5data.curation.scenes import decode_frames, segment
from k5data.curation.vlm import load_vlm
from k5data.sources import Source, SourceObject


class Scorers:
    """Backends chosen by the config, loaded once per process (``backends.cached``); the heuristic defaults load
    no model."""

    def __init__(self, cfg: CurationConfig) -> None:
        self.cfg = cfg
        f, dev = cfg.section("filters"), cfg.get("device", "cpu")
        self.captioner = Captioner({"device": dev, **cfg.section("captions")})
        self.domains = DomainClassifier({"device": dev, **cfg.section("domains")})
        wm, q, cx, cl = f["watermark"], f["quality"], f["complexity"], cfg.section("clusters")
        models = wm["backend"] in ("hf-image-classifier", "models")
        self.watermark = (cached(HFImageClassifier, wm["model_path"], wm["positive_label"], device=dev)
                          if models and wm.get("model_path") else None)
        self.watermark_detector = (cached(HFObjectDetector, wm["detector_path"], device=dev)
                                   if wm["backend"] == "models" and wm.get("detector_path") else None)
        self.quality = self._quality(q, dev) if q["backend"] in ("hf-image-classifier", "models") else None
        sam = cx.get("sam2", {})
        self.segmenter = cached(Sam2Counter, cx["model_path"], device=dev, **sam) if cx["backend"] == "sam2" else None
        mo = f["motion"]
        self.motion = cached(HFVideoRegressor, mo["model_path"], device=dev) if mo["backend"] == "videomae" else None
        self.detector, self.zero_shot = self._classes(cfg.get("classes", {}), dev)
        self.embedder = None
        if cl["embedding"] == "clip":
            scene_path = cfg.get("classes", {}).get("scene", {}).get("model_path")
            # one CLIP load serves the scene classes and the cluster embeddings when they name the same folder
            same = self.zero_shot is not None and scene_path == cl["model_path"]
            self.embedder = self.zero_shot if same else cached(ClipEmbedder, cl["model_path"], device=dev)

    @staticmethod
    def _quality(q: dict[str, Any], dev: str) -> dict[str, Any]:
        label = q["positive_label"]
        out = {"technical": cached(HFImageClassifier, q["technical_model_path"], label, device=dev),
               "aesthetic": cached(HFImageClassifier, q["aesthetic_model_path"], label, device=dev)}
        if q.get("video_model_path"):
            out["video"] = cached(HFVideoRegressor, q["video_model_path"], device=dev)
        if (q.get("qalign") or {}).get("model_path"):
            out["qalign"] = load_vlm(q["qalign"]["model_path"], device=dev)  # the captioner's model when same folder
        return out

    @staticmethod
    def _classes(c: dict[str, Any], dev: str) -> tuple[Any, Any]:
        obj, scene = c.get("objects", {"backend": "none"}), c.get("scene", {"backend": "none"})
        detector = zero_shot = None
        if obj["backend"] == "hf-object-detector":
            detector = cached(HFObjectDetector, obj["model_path"], device=dev)
        elif obj["backend"] != "none":
            raise ValueError(f"unknown classes.objects backend {obj['backend']!r} (none | hf-object-detector)")
        if scene["backend"] == "clip":
            unknown = set(scene["labels"]) - set(SCENE_KEYS)
            if unknown:
                raise ValueError(f"classes.scene.labels has unknown sets {sorted(unknown)} (allowed: {SCENE_KEYS})")
            zero_shot = cached(ClipZeroShot, scene["model_path"], scene["labels"], scene["template"], device=dev)
        elif scene["backend"] != "none":
            raise ValueError(f"unknown classes.scene backend {scene['backend']!r} (none | clip)")
        return detector, zero_shot

    def embed(self, frame: np.ndarray) -> tuple[list[float], str]:
        if self.embedder is not None:
            return self.embedder.embed(frame).tolist(), "clip"
        return thumbnail_embedding(frame).tolist(), "thumbnail-v1"


def _items_for(media: dict[str, Any], path: Path, cfg: CurationConfig) -> list[tuple[dict[str, Any], Item]]:
    max_side = cfg.section("media")["max_frame_side"]
    if media["kind"] == "image":
        from PIL import Image

        with Image.open(path) as im:
            rgb = resize_long(np.asarray(im.convert("RGB")), max_side)
        item = Item("image", media["width"], media["height"], {0: rgb})
        return [({"scene_index": 0, "start_s": None, "end_s": None, "scene_reason": None}, item)]
    sc, f = cfg.section("scenes"), cfg.section("filters")
    scenes = segment(path, sc["detector"], sc["min_s"], sc["max_s"], expected_frames=media.get("n_frames"))
    plans = []
    for scene in scenes:
        plan = {"dyn": scene.at_fps(f["dynamics"]["fps"]), "text": scene.even(f["text_area"]["frames"]),
                "wm": scene.even(f["watermark"]["frames"]), "hash": scene.even(f["dedup"]["video_frames"])}
        plans.append((scene, plan))
    wanted = {i for _, plan in plans for idx in plan.values() for i in idx}
    frames = decode_frames(path, wanted, max_side)
    out = []
    for scene, plan in plans:
        mine = {i: frames[i] for idx in plan.values() for i in idx if i in frames}
        if not mine:
            continue
        item = Item("video", media["width"], media["height"], mine, fps=scene.fps,
                    **{k: [i for i in v if i in mine] for k, v in plan.items()})
        meta = {"scene_index": scene.index, "start_s": round(scene.start_s, 3), "end_s": round(scene.end_s, 3),
                "scene_reason": scene.reason}
        out.append((meta, item))
    return out


def score_item(meta: dict[str, Any], item: Item, cfg: CurationConfig, scorers: Scorers,
               sidecar: dict | None) -> dict[str, Any]:
    f = cfg.section("filters")
    row: dict[str, Any] = dict(meta)
    row.update(kind=item.kind, width=item.width, height=item.height)
    row.update(score_resolution(item, f["resolution"]))
    row["hash"] = video_hash(item.get(item.hash))
    row.update(score_quality(item, f["quality"], scorers.quality))
    initial_ok = row["resolution_passed"] and not meta["scene_reason"]
    if cfg["cascade"] and not initial_ok:
        # Report pipeline order: initial filters first, the model-based ones only on what survives them.
        row["skipped"] = "cascade"
        return row
    # Text area and the watermark heuristic share one detector run per frame, with these settings.
    item.cache["text_det"] = (f["text_area"]["limit_side_len"], f["text_area"]["box_thresh"],
                              f["text_area"].get("model_path"))
    row.update(score_dynamics(item, f["dynamics"]))
    row.update(score_text_area(item, f["text_area"]))
    row.update(score_watermark(item, f["watermark"], scorers.watermark, scorers.watermark_detector))
    row.update(score_complexity(item, f["complexity"], scorers.segmenter))
    row.update(score_motion(item, f["motion"], scorers.motion))
    caption, raw, backend = scorers.captioner.caption(item.kind, item.middle, sidecar, meta["scene_index"])
    row.update(caption=caption, caption_raw=raw, caption_backend=backend)
    row["domain"], row["domain_backend"] = scorers.domains.classify(item.kind, item.middle, caption)
    row.update(classify(item, cfg.get("classes", {}), scorers.detector, scorers.zero_shot))
    row["embedding"], row["embedding_backend"] = scorers.embed(item.middle)
    return row


def score_media(media: dict[str, Any], source: Source, catalog: Catalog, cfg: CurationConfig,
                scorers: Scorers) -> list[dict[str, Any]]:
    """Score one catalogued media file (its first location) and store its rows."""
    obj = SourceObject(media["source_uri"], media["key"], int(media["size"]), "")
    sidecar = None
    key = sidecar_key(media["key"])
    sidecar_version = catalog.sidecar_version(source.name, key)  # as listed by registration, before this read
    if source.exists(key):
        sidecar = parse_sidecar(source.read_bytes(key).decode("utf-8", errors="replace"))
    with tempfile.TemporaryDirectory(prefix="k5-score-") as tmp:
        path, _ = source.local_path(obj, tmp)
        rows = [score_item(meta, item, cfg, scorers, sidecar) for meta, item in _items_for(media, path, cfg)]
    for row in rows:
        row["media_id"] = media["media_id"]
    catalog.save_items(media["media_id"], rows, sidecar_version)
    return rows
