"""A caption variant per training step (report §4.6: every SFT item has very long / long / medium / short / very
short captions in English and Russian; the trainer sees a different one each time it meets the item).

An SFT shard stores the variants in the sample's caption field as ``VARIANTS_PREFIX + JSON`` of
``{"<lang>": {"<length>": text}}`` (``k5data.sft.variants`` writes it); a plain caption passes through unchanged, so
pre-training shards train exactly as before. The draw is uniform over the (language, length) pairs present, from a
generator the data source seeds per (seed, rank, batch index): resume-exact and independent of the other draws.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

VARIANTS_PREFIX = "k5-caption-variants:"


def caption_choices(caption: str) -> list[str]:
    """Every variant text of ``caption`` in (language, length) order, or ``[caption]`` for a plain caption.
    Raises ValueError naming the caption when its variant JSON is malformed or holds no text."""
    if not caption.startswith(VARIANTS_PREFIX):
        return [caption]
    try:
        table = json.loads(caption[len(VARIANTS_PREFIX):])
        texts = [str(t) for lang in sorted(table) for _, t in sorted(table[lang].items()) if str(t).strip()]
    except (ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"caption variants {caption[:80]!r}... are not JSON of {{lang: {{length: text}}}}") from err
    if not texts:
        raise ValueError(f"caption variants {caption[:80]!r} hold no text")
    return texts


def pick_captions(captions: Sequence[str], generator: torch.Generator) -> list[str]:
    """One variant per caption, drawn uniformly with ``generator`` (one draw per caption, plain ones included, so
    the stream of draws does not depend on which captions have variants)."""
    draws = torch.rand(len(captions), generator=generator).tolist()
    out = []
    for caption, u in zip(captions, draws):
        choices = caption_choices(caption)
        out.append(choices[min(int(u * len(choices)), len(choices) - 1)])
    return out
