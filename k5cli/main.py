"""``k5`` command line. Subcommands import their heavy dependencies lazily, so ``k5 --help`` and this module stay
light (no torch/diffusers at import time, never Dagster/MLflow); other packages add commands with ``main.add_command``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


class K5Error(click.ClickException):
    """A user-facing error: one ``Error: ...`` line on stderr and exit code 2 (no traceback)."""

    exit_code = 2


@click.group()
def main() -> None:
    """Kandinsky 5 lifecycle tools."""


def format_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


@main.command()
@click.argument("preset")
def info(preset: str) -> None:
    """Print a model preset's configuration and exact parameter count (built on the meta device: no memory)."""
    import torch

    from k5model.config import PRESETS, get_preset
    from k5model.crossdit import CrossDiT

    if preset not in PRESETS:
        raise K5Error(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = CrossDiT(cfg)
    n = sum(p.numel() for p in model.parameters())
    for key, value in cfg.to_dict().items():
        click.echo(f"  {key}: {value}")
    click.echo(f"  heads: {cfg.num_heads} x head_dim {cfg.head_dim}")
    click.echo(f"{preset}: {format_params(n)} parameters ({n:,})")


def _quiet_libraries() -> None:
    # Loading bars of transformers/diffusers would drown our own progress bar.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import diffusers
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        diffusers.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output file: .png (image) or .mp4.")
@click.option("--negative-prompt", default=None,
              help="Negative prompt (default: the official one for video, '' for images).")
@click.option("--height", type=int, default=None, help="Pixel height (multiple of 16; 128 for NABLA models).")
@click.option("--width", type=int, default=None, help="Pixel width (multiple of 16; 128 for NABLA models).")
@click.option("--frames", type=int, default=None, help="Video frames, 4k+1 (default 121).")
@click.option("--steps", type=int, default=None, help="Euler steps (default: the folder's sampling_config.json or 50).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default 5.0 video, 3.5 image; 1 = no CFG).")
@click.option("--shift", type=float, default=None, help="Time shift (default 10 video, 3 image).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image", type=click.Path(path_type=Path), default=None, help="First frame for image-to-video models.")
@click.option("--edit", "edit", type=click.Path(path_type=Path), default=None,
              help="Source image to edit with an instruct-editing (I2I) model; --prompt is the instruction.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--fps", type=int, default=24, show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def generate(
    model_dir: Path, prompt: str, out: Path, negative_prompt: str | None, height: int | None, width: int | None,
    frames: int | None, steps: int | None, guidance: float | None, shift: float | None, seed: int, image: Path | None,
    edit: Path | None, device: str, fps: int, no_progress: bool,
) -> None:
    """Generate a video or image with the Kandinsky 5 pipeline folder MODEL_DIR (``--edit SOURCE``: edit SOURCE by
    the instruction in --prompt with an instruct-editing model)."""
    if not prompt.strip():
        raise K5Error(f"--prompt must not be empty, got {prompt!r}")
    suffix = out.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".webp", ".mp4"):
        raise K5Error(f"--out {str(out)!r}: unsupported extension {out.suffix!r}; use .png or .mp4")
    from k5model.media import save_media
    from k5model.pipeline import K5Pipeline, inspect_model_dir

    try:
        task = inspect_model_dir(model_dir)["task"]  # cheap checks (JSON only) before diffusers/weights load
    except ValueError as e:
        raise K5Error(str(e)) from None
    _quiet_libraries()
    if (task in ("t2i", "i2i")) != (suffix != ".mp4"):
        want = ".png" if task in ("t2i", "i2i") else ".mp4"
        raise K5Error(f"--out {str(out)!r}: a {task} model writes {want} files")
    if edit is not None and (task != "i2i" or image is not None):
        raise K5Error(f"--edit needs an instruct-editing (i2i) pipeline folder and no --image; {model_dir} is {task}")
    option, image = ("--edit", edit) if edit is not None else ("--image", image)
    first = None
    if image is not None:
        import numpy as np
        from PIL import Image

        try:
            first = np.asarray(Image.open(image).convert("RGB"))
        except OSError as e:
            raise K5Error(f"{option} {str(image)!r} cannot be read: {e}") from None
    try:
        pipe = K5Pipeline.from_pretrained(model_dir, device=device)
        result = pipe.generate(
            prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=frames, num_steps=steps,
            guidance_scale=guidance, shift=shift, seed=seed, image=first, progress=not no_progress,
        )
        path = save_media(result.frames, out, fps=fps)
    except ValueError as e:
        raise K5Error(str(e)) from None
    t, s = result.timings, result.sampling
    click.echo(f"wrote {path} ({result.frames.shape[0]} frame(s) {result.frames.shape[1]}x{result.frames.shape[2]}; "
               f"{s['num_steps']} steps, guidance {s['guidance_scale']:g}, {s['grid']} grid"
               f"{', MagCache' if s['magcache'] else ''}; sampling {t['sample_s']:.1f}s, total {t['total_s']:.1f}s)")


def _register_subcommands() -> None:
    # These modules import only click at load time, so `k5 --help` stays fast.
    from k5cli.curate import curate
    from k5cli.edit_pairs import edit_pairs
    from k5cli.latents import latents
    from k5cli.rl import rl
    from k5cli.sbs import sbs
    from k5cli.sft import sft
    from k5cli.soup import soup
    from k5cli.train import plan_cmd, stages, train

    main.add_command(curate)  # k5 curate SRC OUT
    main.add_command(edit_pairs)  # k5 edit-pairs CURATED OUT [--config YAML] (report §4.3)
    main.add_command(latents)  # k5 latents DATASET STORE --video-vae PATH
    main.add_command(rl)  # k5 rl pairs|reward|draft (report §6.6)
    main.add_command(sbs)  # k5 sbs score JUDGMENTS
    main.add_command(sft)  # k5 sft batch|simulate|build|status|annotator (report §4.6)
    main.add_command(soup)  # k5 soup OUT --member DOMAIN[/SUB]:SIZE:PATH ... | --recipe FILE
    main.add_command(plan_cmd)  # k5 plan STAGE --gpus N [--ref-seconds 6.30]
    main.add_command(stages)  # k5 stages (report Table 4)
    main.add_command(train)  # k5 train STAGE --out DIR [--demo] [--nproc N]


_register_subcommands()


if __name__ == "__main__":
    sys.exit(main())
