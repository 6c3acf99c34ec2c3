"""Media I/O of latent pre-encoding: local paths of media URIs (``s3://`` objects fetched through the object store),
image and video frame decoding, and the resize/crop rule.

Resize/crop: the frame is resized to *cover* the bucket (scale ``max(bh/H, bw/W)``, both sides rounded up; area
filter when shrinking, bicubic when enlarging) and centre-cropped to exactly ``bh×bw``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from k5data.object_store import ObjectStore, open_store


def resize_cover_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 to cover ``height × width``, then centre-crop to it (the module's rule)."""
    import cv2

    h, w = rgb.shape[:2]
    s = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * s - 1e-6)), max(width, math.ceil(w * s - 1e-6))
    if (nh, nw) != (h, w):
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


class MediaFetcher:
    """Local paths of media URIs: local files in place, ``s3://`` objects downloaded into ``tmp`` through the object
    store of their bucket (one store per bucket, reused)."""

    def __init__(self, tmp: Path, endpoint_url: str | None = None) -> None:
        self.tmp, self.endpoint_url = Path(tmp), endpoint_url
        self._stores: dict[str, ObjectStore] = {}

    def local(self, uri: str) -> Path:
        from urllib.parse import unquote, urlparse

        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            if parsed.netloc not in self._stores:
                self._stores[parsed.netloc] = open_store(f"s3://{parsed.netloc}", self.endpoint_url)
            dest = self.tmp / f"{len(list(self.tmp.iterdir()))}{Path(parsed.path).suffix}"
            return self._stores[parsed.netloc].get_file(parsed.path.lstrip("/"), dest)
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
        if not path.is_file():
            raise FileNotFoundError(f"media {uri!r} not found")
        return path

    def clear(self) -> None:
        """Delete the downloaded media (the batch is encoded)."""
        for f in self.tmp.iterdir():
            f.unlink()


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_video_frames(path: Path, indices: list[int]) -> np.ndarray:
    """Decode once, front to back, keeping frames ``indices`` (repeats allowed) -> (F, H, W, 3) uint8."""
    import av

    wanted, got = set(indices), {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    if len(got) < len(wanted):
        # the container ended early (frame rate metadata vs real frames): repeat the last decoded frame
        if not got:
            raise ValueError(f"video {path} has no frames in {min(indices)}..{max(indices)}")
        last = got[max(got)]
        got.update({i: last for i in wanted - set(got)})
    return np.stack([got[i] for i in indices])
