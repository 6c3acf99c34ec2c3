"""Per-media scoring: segment videos into scenes, decode the sampled frames once, run every filter, caption,
classify the domain and embed. Results are stored per row (image or scene) in the catalog."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from k5data.curation.backends import ClipEmbedder, HFImageClassifier, Sam2Counter, cached
from k5data.curation.captions import Captioner, parse_sidecar, sidecar_key
from k5data.curation.catalog import Catalog
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
from k5data.sources import Source, SourceObject


class Scorers:
    """Backends chosen by the config, loaded once per process."""

    def __init__(self, cfg: CurationConfig) -> None:
        self.cfg = cfg
        f = cfg.section("filters")
        self.captioner = Captioner(cfg.section("captions"))
        self.domains = DomainClassifier(cfg.section("domains"))
        wm, q, cx, cl = f["watermark"], f["quality"], f["complexity"], cfg.section("clusters")
        self.watermark = (cached(HFImageClassifier, wm["model_path"], wm["positive_label"])
                          if wm["backend"] == "hf-image-classifier" else None)
        self.quality = ({"technical": cached(HFImageClassifier, q["technical_model_path"], q["positive_label"]),
                         "aesthetic": cached(HFImageClassifier, q["aesthetic_model_path"], q["positive_label"])}
                        if q["backend"] == "hf-image-classifier" else None)
        self.segmenter = cached(Sam2Counter, cx["model_path"]) if cx["backend"] == "sam2" else None
        self.embedder = cached(ClipEmbedder, cl["model_path"]) if cl["embedding"] == "clip" else None

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
    item.cache["text_det"] = (f["text_area"]["limit_side_len"], f["text_area"]["box_thresh"])
    row.update(score_dynamics(item, f["dynamics"]))
    row.update(score_text_area(item, f["text_area"]))
    row.update(score_watermark(item, f["watermark"], scorers.watermark))
    row.update(score_complexity(item, f["complexity"], scorers.segmenter))
    row.update(score_motion(item, f["motion"]))
    caption, raw, backend = scorers.captioner.caption(item.kind, item.middle, sidecar, meta["scene_index"])
    row.update(caption=caption, caption_raw=raw, caption_backend=backend)
    row["domain"], row["domain_backend"] = scorers.domains.classify(item.kind, item.middle, caption)
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
