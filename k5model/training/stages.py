"""Every pre-training stage of the technical report's Table 4 as typed data, chained as in Figure 18.

Numbers (steps, batch, lr, weight decay, resolution probabilities) are copied verbatim from Table 4; task mixes come
from §6.2/§6.3 (Lite 1/79/20 % t2i/t2v/i2v, Pro 2/77/21 %, editing 80 % edit / 20 % t2i); NABLA where §6.3.1 puts it
("for 1024 resolution or for videos up to 10 seconds long at 512 resolution"). Figure 18 is an image in our text copy,
so parents follow the prose of §6.2 that describes it.

``StageConfig`` cannot hold these rows directly: its resolutions are latent voxels (Table 4 gives pixels) and it has
no maximum clip length. ``TableStage`` therefore keeps the table's own units and converts on demand
(``to_stage_config``); ``demo_scaling`` gives the CPU-sized version of a stage.

No torch import of its own (the ``k5model`` package __init__ still imports torch, ~1 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from k5model.training.config import TASKS, StageConfig

TABLE_TASKS = TASKS  # "edit": instruct editing (§6.3.1): source latent + mask in the condition channels

VAE_SPATIAL = 8  # HunyuanVideo and FLUX VAEs both downsample 8x in space
VAE_TEMPORAL = 4  # HunyuanVideo VAE: 4k+1 frames -> k+1 latent frames
FPS = 24  # official clips: 5 s = 121 frames, 10 s = 241 frames

# §6.2 task mixes
LITE_TASKS = {"t2i": 0.01, "t2v": 0.79, "i2v": 0.20}
PRO_TASKS = {"t2i": 0.02, "t2v": 0.77, "i2v": 0.21}
T2I_ONLY = {"t2i": 1.0}
EDIT_TASKS = {"edit": 0.8, "t2i": 0.2}  # "performs instructional editing 80% and text-to-image generation 20%"


def pixel_frames(seconds: float) -> int:
    """Frames of a clip of ``seconds`` at 24 fps in the VAE's 4k+1 form (5 s -> 121, 10 s -> 241); images: 1."""
    return 1 if seconds <= 0 else int(round(seconds * FPS)) + 1


def latent_frames(seconds: float) -> int:
    """Latent frames after the 4x temporal VAE (5 s -> 31, the 31 of the report's S0; 10 s -> 61)."""
    return (pixel_frames(seconds) - 1) // VAE_TEMPORAL + 1


@dataclass(frozen=True)
class TableStage:
    """One row of Table 4, in the table's units (pixel resolutions, max clip seconds)."""

    name: str
    row: str  # the row label as printed in Table 4, e.g. "Video Lite (MR, 5 seconds)"
    preset: str  # k5model.config preset
    steps: int
    batch: int  # global batch (samples per optimiser step)
    lr: float
    weight_decay: float
    resolutions: dict[str, float]  # "HxW" in pixels -> probability, exactly as printed
    tasks: dict[str, float]
    max_seconds: float  # 0 for image-only stages
    attention: str = "regular"
    parent: str | None = None
    # Shared recipe of §6.3.2 (the warm-up length is not given in the report, hence not encoded).
    ema_decay: float = 0.9999
    uncond_prob: float = 0.1
    grad_clip: float = 1.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for label, probs in (("resolutions", self.resolutions), ("tasks", self.tasks)):
            if not probs or any(p < 0 for p in probs.values()) or abs(sum(probs.values()) - 1.0) > 1e-9:
                raise ValueError(f"{self.name}: {label} probabilities must be non-negative and sum to 1, got {probs}")
        unknown = set(self.tasks) - set(TABLE_TASKS)
        if unknown:
            raise ValueError(f"{self.name}: unknown tasks {sorted(unknown)}")
        for key in self.resolutions:
            h, w = StageConfig.parse_resolution(key)
            if h % (2 * VAE_SPATIAL) or w % (2 * VAE_SPATIAL):  # VAE 8x then patch 2x2
                raise ValueError(f"{self.name}: {key} is not a multiple of 16 pixels")

    @property
    def is_video(self) -> bool:
        return self.max_seconds > 0

    @property
    def frames(self) -> int:
        """Latent frames of a full-length video sample of this stage (1 for image stages)."""
        return latent_frames(self.max_seconds)

    def latent_resolutions(self) -> dict[str, float]:
        return {f"{h // VAE_SPATIAL}x{w // VAE_SPATIAL}": p
                for h, w, p in ((*StageConfig.parse_resolution(k), p) for k, p in self.resolutions.items())}

    def to_stage_config(self, **overrides: Any) -> StageConfig:
        """The full-scale ``StageConfig`` (latent resolutions, latent frames, the task mix as printed)."""
        cfg = StageConfig(
            name=self.name, steps=self.steps, batch=self.batch, lr=self.lr, weight_decay=self.weight_decay,
            grad_clip=self.grad_clip, resolutions=self.latent_resolutions(), tasks=dict(self.tasks),
            frames=self.frames if self.is_video else 2, attention=self.attention, ema_decay=self.ema_decay,
            uncond_prob=self.uncond_prob, parent=self.parent, model_preset=self.preset,
        )
        return cfg.replace(**overrides) if overrides else cfg


# ---------------------------------------------------------------------------------------------------------------------
# Table 4 resolution rows (pixels). Rows that repeat in the table share one constant; values are as printed.

_IMG_LR = {"256x256": 0.224, "192x320": 0.11, "320x192": 0.332, "160x352": 0.005, "352x160": 0.012,
           "224x288": 0.144, "288x224": 0.173}
_IMG_MR = {"512x512": 0.3152, "640x384": 0.5301, "384x640": 0.1547}
_IMG_HR = {"1024x1024": 0.183, "1408x640": 0.017, "640x1408": 0.010, "1280x768": 0.315, "768x1280": 0.115,
           "1152x896": 0.175, "896x1152": 0.185}
_EDIT_MR = {"512x512": 0.479, "384x640": 0.4, "640x384": 0.121}
_EDIT_HR = {"1024x1024": 0.297, "640x1408": 0.012, "1408x640": 0.005, "768x1280": 0.258, "1280x768": 0.093,
            "896x1152": 0.136, "1152x896": 0.199}
_VID_LR = {"256x256": 0.25, "256x384": 0.22, "384x256": 0.53}
_VID_MR = {"512x512": 0.28, "512x768": 0.25, "768x512": 0.47}
_VID_HR = {"1024x1024": 0.183, "1408x640": 0.017, "640x1408": 0.01, "1280x768": 0.315, "768x1280": 0.115,
           "1152x896": 0.175, "896x1152": 0.185}

_PARENT_NOTE = "parent from §6.2 prose (Figure 18 is an image in our copy)"

TABLE4: dict[str, TableStage] = {s.name: s for s in (
    # Image Lite 6B: LR -> MR -> HR; editing branches off the shared MR checkpoint (§6.2).
    TableStage("image_lite_lr", "Image Lite (LR)", "image_lite", 400_000, 8000, 1e-4, 0.0, _IMG_LR, T2I_ONLY, 0),
    TableStage("image_lite_mr", "Image Lite (MR)", "image_lite", 200_000, 4000, 4.0e-05, 0.0, _IMG_MR, T2I_ONLY, 0,
               parent="image_lite_lr"),
    TableStage("image_lite_hr", "Image Lite (HR)", "image_lite", 200_000, 2000, 3.0e-05, 0.0, _IMG_HR, T2I_ONLY, 0,
               parent="image_lite_mr"),
    TableStage("image_edit_mr", "Image Editing (MR)", "image_lite_edit", 200_000, 4000, 4.0e-05, 0.001, _EDIT_MR,
               EDIT_TASKS, 0, parent="image_lite_mr",
               notes=("input projection widened from the T2I parent: condition + mask channels start at zero",)),
    TableStage("image_edit_hr", "Image Editing (HR)", "image_lite_edit", 110_000, 2000, 2.0e-05, 0.001, _EDIT_HR,
               EDIT_TASKS, 0, parent="image_edit_mr"),
    # Video Lite 2B: T2I LR -> T2V+I2V LR (5 s) -> MR 5 s -> MR 10 s (NABLA).
    TableStage("video_lite_t2i_lr", "Video Lite (T2I, LR)", "video_lite", 220_000, 8192, 1e-4, 0.0, _VID_LR,
               T2I_ONLY, 0),
    TableStage("video_lite_lr", "Video Lite (T2V + I2V, LR)", "video_lite", 10_000, 2662, 6.0e-05, 0.001, _VID_LR,
               LITE_TASKS, 5, parent="video_lite_t2i_lr", notes=("5 s from §6.2: LR and MR stages use 5 s clips",)),
    TableStage("video_lite_mr_5s", "Video Lite (MR, 5 seconds)", "video_lite", 50_000, 1331, 3.0e-05, 0.001,
               _VID_MR, LITE_TASKS, 5, parent="video_lite_lr"),
    TableStage("video_lite_mr_10s", "Video Lite (MR, 10 seconds)", "video_lite", 10_000, 665, 3.0e-05, 0.001,
               _VID_MR, LITE_TASKS, 10, attention="nabla", parent="video_lite_mr_5s",
               notes=(_PARENT_NOTE + ": from the 5 s pre-training, not the 5 s SFT branch",)),
    # Video Pro 19B: T2I LR -> LR -> MR -> HR 5 s (NABLA) -> HR 10 s (NABLA).
    TableStage("video_pro_t2i_lr", "Video Pro (T2I, LR)", "video_pro", 200_000, 16384, 1e-4, 0.0, _VID_LR,
               T2I_ONLY, 0),
    TableStage("video_pro_lr", "Video Pro (LR)", "video_pro", 200_000, 2662, 1e-4, 0.0, _VID_LR, PRO_TASKS, 5,
               parent="video_pro_t2i_lr", notes=("max length 5 s inferred: §6.2 grows it 5 -> 10 s over the stages",)),
    TableStage("video_pro_mr", "Video Pro (MR)", "video_pro", 45_000, 1331, 3.0e-05, 0.001, _VID_MR, PRO_TASKS, 5,
               parent="video_pro_lr", notes=("max length 5 s inferred: §6.2 grows it 5 -> 10 s over the stages",)),
    TableStage("video_pro_hr_5s", "Video Pro (HR, 5 seconds)", "video_pro", 22_500, 665, 2.0e-05, 0.001, _VID_HR,
               PRO_TASKS, 5, attention="nabla", parent="video_pro_mr"),
    TableStage("video_pro_hr_10s", "Video Pro (HR, 10 seconds)", "video_pro", 10_000, 333, 2.0e-05, 0.001, _VID_HR,
               PRO_TASKS, 10, attention="nabla", parent="video_pro_hr_5s"),
)}

# Figure 18 order. image_lite is a tree: image_edit_mr branches from image_lite_mr, not from image_lite_hr.
CHAINS: dict[str, list[str]] = {
    "video_lite": ["video_lite_t2i_lr", "video_lite_lr", "video_lite_mr_5s", "video_lite_mr_10s"],
    "image_lite": ["image_lite_lr", "image_lite_mr", "image_lite_hr", "image_edit_mr", "image_edit_hr"],
    "video_pro": ["video_pro_t2i_lr", "video_pro_lr", "video_pro_mr", "video_pro_hr_5s", "video_pro_hr_10s"],
}


def get_table_stage(name: str) -> TableStage:
    if name not in TABLE4:
        raise KeyError(f"unknown Table 4 stage {name!r}; choose one of: {', '.join(TABLE4)}")
    return TABLE4[name]


def lineage(name: str) -> list[str]:
    """Names from the chain's root down to ``name`` (following ``parent``)."""
    out = [name]
    while (parent := get_table_stage(out[-1]).parent) is not None:
        out.append(parent)
    return out[::-1]


# ---------------------------------------------------------------------------------------------------------------------
# CPU demo scaling

DEMO_PRESET = {"image_lite": "tiny_image", "image_lite_edit": "tiny_image_edit", "video_lite": "tiny",
               "video_pro": "tiny"}
DEMO_PIXELS_PER_LATENT = 64  # demo latent side = pixels / 64: 256 px -> 4, 1024 px -> 16 (tiny, relative sizes kept)
DEMO_NABLA_MULTIPLE = 16  # NABLA needs token grids in 8x8 tiles = latent sides in multiples of 16 (patch 2)


def _demo_side(pixels: int, multiple: int) -> int:
    return max(multiple, int(round(pixels / DEMO_PIXELS_PER_LATENT / multiple)) * multiple)


def demo_scaling(stage: TableStage | str, *, steps: int = 3, batch: int = 2) -> StageConfig:
    """The same stage on the ``tiny`` preset, sized for CPU: a few steps, tiny latents, 2-3 latent frames.

    Keeps name, parent, attention kind, lr/weight decay, task mix and the *shape* of the resolution mix (pixel sizes
    / 64 -> latent sides, merged where two rows collapse to one). Image Lite stages train the ``tiny_image`` preset,
    the editing stages ``tiny_image_edit`` (its condition + mask channels), video stages ``tiny``."""
    table = get_table_stage(stage) if isinstance(stage, str) else stage
    multiple = DEMO_NABLA_MULTIPLE if table.attention == "nabla" else 2  # patch (1, 2, 2) needs even latent sides
    resolutions: dict[str, float] = {}
    for key, p in table.resolutions.items():
        h, w = StageConfig.parse_resolution(key)
        small = f"{_demo_side(h, multiple)}x{_demo_side(w, multiple)}"
        resolutions[small] = resolutions.get(small, 0.0) + p
    total = sum(resolutions.values())  # re-normalise away float rounding of the merged sums
    resolutions = {k: v / total for k, v in resolutions.items()}
    frames = 3 if table.max_seconds > 5 else 2  # 10 s stages stay longer than 5 s ones
    return table.to_stage_config(
        steps=steps, batch=batch, resolutions=resolutions, frames=frames, model_preset=DEMO_PRESET[table.preset],
        ema_decay=0.9, warmup_steps=1,
    )
