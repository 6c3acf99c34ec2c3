"""Media probing: what a file really is (magic bytes, not its name), and whether it decodes to the end.

Every problem becomes a ``ProbeError`` with a readable reason, which the catalog stores in its quarantine table.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Container family expected for each extension, and how each family is recognised from the first bytes.
EXT_FAMILY = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".tif": "tiff",
              ".tiff": "tiff", ".mp4": "isobmff", ".mov": "isobmff", ".mkv": "matroska", ".webm": "matroska",
              ".avi": "avi"}
VIDEO_FAMILIES = {"isobmff", "matroska", "avi"}


class ProbeError(Exception):
    """A file that cannot enter the catalog; ``str(err)`` is the quarantine reason."""


@dataclass
class MediaInfo:
    kind: str            # image | video
    format: str          # container family from the magic bytes
    codec: str
    width: int
    height: int
    fps: float | None
    duration: float | None
    n_frames: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sniff(head: bytes) -> str | None:
    """Container family from the first bytes, or None when unknown."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp":
        return "isobmff"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None


def check_pixels(kind: str, width: int, height: int, max_megapixels: float | None) -> None:
    """Refuse media whose decoded frame would exceed the pixel budget (bounded memory, not an out-of-memory kill)."""
    if max_megapixels and width * height > max_megapixels * 1e6:
        raise ProbeError(f"{kind} too large to decode: {width}x{height} = {width * height / 1e6:.1f} megapixels over "
                         f"the budget media.max_megapixels={max_megapixels:g}")


def probe_image(data: bytes, family: str, max_megapixels: float | None = None) -> MediaInfo:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels("image", im.width, im.height, max_megapixels)  # from the header, before decoding
            im.load()  # full decode: catches truncation that the header alone would hide
            width, height, codec = im.width, im.height, (im.format or family).lower()
    except ProbeError:
        raise
    except Image.DecompressionBombError as err:
        raise ProbeError(f"image too large to decode: {err}") from err
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise ProbeError(f"truncated or corrupt {family} image: {err}") from err
    return MediaInfo("image", family, codec, width, height, None, None, 1)


def probe_video(path: str | Path, family: str, max_megapixels: float | None = None) -> MediaInfo:
    import av

    try:
        container = av.open(str(path))
    except Exception as err:
        raise ProbeError(f"unreadable or truncated {family} video: {err}") from err
    with container:
        if not container.streams.video:
            raise ProbeError(f"{family} file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        check_pixels("video frame", width or 0, height or 0, max_megapixels)
        fps = float(stream.average_rate or stream.guessed_rate or 0) or None
        declared = stream.frames or None
        duration = float(container.duration / 1e6) if container.duration else None
        packets = frames = 0
        try:
            # Decode through to the end: a corrupt middle demuxes fine but stops the decoder (scene detection
            # would then see a clip cut short); an index promising more frames than the bytes hold is truncation.
            for packet in container.demux(stream):
                packets += bool(packet.size)
                frames += len(packet.decode())
        except Exception as err:
            raise ProbeError(f"corrupt {family} video: decoding failed after {frames} of "
                             f"{declared or packets} frames ({err})") from err
    if packets == 0:
        raise ProbeError(f"{family} video has no frames")
    if declared and packets < 0.98 * declared:
        raise ProbeError(f"truncated {family} video: {packets} of {declared} frames present")
    if frames < 0.98 * packets:
        raise ProbeError(f"corrupt {family} video: only {frames} of {packets} frames decode")
    if not width or not height:
        raise ProbeError(f"{family} video has no frame size")
    if duration is None and fps:
        duration = packets / fps
    return MediaInfo("video", family, codec, width, height, fps, duration, declared or packets)


def probe_file(path: str | Path, name: str, size: int, image_exts: list[str], video_exts: list[str], *,
               max_megapixels: float | None = None) -> MediaInfo:
    """Probe one file; ``name`` (its key) gives the extension it claims; frames over ``max_megapixels`` are refused.
    Raises ProbeError with the reason."""
    ext = Path(name).suffix.lower()
    if ext not in image_exts and ext not in video_exts:
        raise ProbeError(f"unsupported file type '{ext or '(no extension)'}'")
    if size == 0:
        raise ProbeError("empty file (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(32)
    family = sniff(head)
    expected = EXT_FAMILY.get(ext)
    if family is None:
        raise ProbeError(f"unrecognised content: '{ext}' file is not a valid {expected or ext} file")
    if expected and family != expected:
        raise ProbeError(f"mislabelled file: extension '{ext}' but the content is {family}")
    if family in VIDEO_FAMILIES:
        return probe_video(path, family, max_megapixels)
    return probe_image(Path(path).read_bytes(), family, max_megapixels)
