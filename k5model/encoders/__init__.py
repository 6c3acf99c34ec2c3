"""Text encoders (Qwen2.5-VL, CLIP) and VAEs (HunyuanVideo, FLUX) of Kandinsky 5.0."""

from k5model.encoders.text import (
    DEFAULT_MAX_LENGTH,
    OFFICIAL_CROP,
    PROMPT_TEMPLATES,
    ClipTextEncoder,
    QwenTextEncoder,
    TextEncoding,
    template_prefix,
)
from k5model.encoders.vae import ImageVAE, VideoVAE

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "OFFICIAL_CROP",
    "PROMPT_TEMPLATES",
    "ClipTextEncoder",
    "ImageVAE",
    "QwenTextEncoder",
    "TextEncoding",
    "VideoVAE",
    "template_prefix",
]
