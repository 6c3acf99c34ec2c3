"""Typed configuration of the CrossDiT transformer and its named presets.

Field names follow diffusers' ``Kandinsky5Transformer3DModel`` config so a ``transformer/config.json`` written by
either library loads in the other unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIFFUSERS_CLASS_NAME = "Kandinsky5Transformer3DModel"
DIFFUSERS_VERSION = "0.42.1"


@dataclass
class CrossDiTConfig:
    in_visual_dim: int = 16
    in_text_dim: int = 3584
    in_text_dim2: int = 768
    time_dim: int = 512
    out_visual_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_dim: int = 1792
    ff_dim: int = 7168
    num_text_blocks: int = 2
    num_visual_blocks: int = 32
    axes_dims: tuple[int, int, int] = (16, 24, 24)
    visual_cond: bool = False
    # "regular" (dense) or "nabla" (block-sparse, report §5.4)
    attention_type: str = "regular"
    attention_causal: bool | None = None
    attention_local: bool | None = None
    attention_glob: bool | None = None
    attention_window: int | None = None
    attention_P: float | None = None
    attention_wT: int | None = None
    attention_wW: int | None = None
    attention_wH: int | None = None
    attention_add_sta: bool | None = None
    attention_method: str | None = None
    # Extra keys seen in a loaded config.json that we keep for round-tripping.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.axes_dims = tuple(int(a) for a in self.axes_dims)
        if self.model_dim % self.head_dim != 0:
            raise ValueError(f"model_dim {self.model_dim} is not a multiple of head_dim {self.head_dim} "
                             "(sum of axes_dims)")
        if any(a % 2 for a in self.axes_dims):
            raise ValueError(f"every axes_dims entry must be even for RoPE pairs, got {self.axes_dims}")
        if self.attention_type not in ("regular", "nabla"):
            raise ValueError(f"attention_type must be 'regular' or 'nabla', got {self.attention_type!r}")

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def visual_embed_dim(self) -> int:
        return 2 * self.in_visual_dim + 1 if self.visual_cond else self.in_visual_dim

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["patch_size"] = list(self.patch_size)
        d["axes_dims"] = list(self.axes_dims)
        return d

    def to_json_dict(self) -> dict[str, Any]:
        """config.json contents, diffusers-compatible."""
        d = {"_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
        d.update(self.extra)
        d.update(self.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrossDiTConfig:
        """From config.json keys (diffusers) or the official ``dit_params``: the official editing config says
        ``instruct_type: channel`` for what diffusers calls ``visual_cond: true`` (the same 2·16+1 input channels)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        if d.get("instruct_type") == "channel":
            known["visual_cond"] = True
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> CrossDiTConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> CrossDiTConfig:
        return dataclasses.replace(self, **changes)


# Dimensions from the official configs (see shared/reference/official_code_notes.md).
PRESETS: dict[str, CrossDiTConfig] = {
    "video_lite": CrossDiTConfig(
        time_dim=512, model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32,
        axes_dims=(16, 24, 24), visual_cond=True,
    ),
    "video_pro": CrossDiTConfig(
        time_dim=1024, model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60,
        axes_dims=(32, 48, 48), visual_cond=True,
    ),
    "image_lite": CrossDiTConfig(
        time_dim=512, model_dim=2560, ff_dim=10240, num_text_blocks=2, num_visual_blocks=50,
        axes_dims=(32, 48, 48), visual_cond=False,
    ),
    # CPU preset for tests and the demo: 2 heads of 16, text width shrunk to match tiny encoders.
    "tiny": CrossDiTConfig(
        in_text_dim=32, in_text_dim2=32, time_dim=32, model_dim=32, ff_dim=64, num_text_blocks=1,
        num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
    ),
}
# Instruct editing (report §6.3.1, Figure 19b): Image Lite with the source-image latent (16) and mask (1) channels
# concatenated to the noisy latent before the input projection, i.e. visual_embeddings.in_layer of 4·33 inputs. The
# released editing checkpoint has exactly these keys and shapes (docs/editing.md, "Instruct-editing regime").
PRESETS["image_lite_edit"] = PRESETS["image_lite"].replace(visual_cond=True)
# The tiny preset as an image model (no visual-condition channels, like image_lite): the demo's Image Lite stages.
PRESETS["tiny_image"] = PRESETS["tiny"].replace(visual_cond=False)
# ... and as the editing model (the demo's Image Editing stages).
PRESETS["tiny_image_edit"] = PRESETS["tiny_image"].replace(visual_cond=True)
# Editing preset of each image preset: what an Image Editing stage trains, initialised from its t2i parent.
EDIT_PRESET_OF = {"image_lite": "image_lite_edit", "tiny_image": "tiny_image_edit"}

# Nominal sizes the presets must land near (report Table 3 / model cards).
NOMINAL_PARAMS = {"video_lite": 2e9, "video_pro": 19e9, "image_lite": 6e9, "image_lite_edit": 6e9}

# Official NABLA settings for 10 s Lite models.
NABLA_10S = dict(attention_type="nabla", attention_P=0.9, attention_wT=11, attention_wH=3, attention_wW=3,
                 attention_add_sta=True, attention_method="topcdf")


def get_preset(name: str, **overrides: Any) -> CrossDiTConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else dataclasses.replace(PRESETS[name])
