"""Building one SBS batch: both models' generations on the same prompts and seeds, golden pairs, the annotation plan.

Layout of a batch folder (``K5_HOME/sbs/<comparison>/``): ``media/`` (clips or images, paths in the plan are relative
to it), ``plan.json``, ``judgments.duckdb`` (the judgments store, see ``judgments_store``) and ``report/``.
"""

from __future__ import annotations

import gc
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from evaluation.sbs.comparisons import Comparison
from evaluation.sbs.sbs_plan import Plan, PlanItem, build_plan, coverage, degrade_frames, golden_specs, under_covered

Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """How a batch is generated and planned."""

    subset_size: int = 4
    """Prompts taken from the start of the prompt set."""
    annotators: tuple[str, ...] = tuple(f"annotator_{k:02d}" for k in range(1, 7))
    """Annotator accounts the plan assigns pairs to."""
    overlap: int = 5
    """Distinct annotators per pair (report §8.2: 5)."""
    golden_identical: int = 1
    """Golden pairs showing the same media on both sides."""
    golden_degraded: int = 1
    """Golden pairs with one side clearly degraded."""
    height: int = 64
    """Requested height in pixels; rounded up to a size both models accept (``K5Pipeline.size_multiple``)."""
    width: int = 64
    """Requested width in pixels; rounded up like ``height``."""
    num_frames: int = 9
    """Frames per clip (4k+1) for video models."""
    num_steps: int = 4
    """Sampler steps of a model without its own sampling settings."""
    own_sampling: bool = True
    """A folder with ``sampling_config.json`` (a distilled model: Flash's 16 NFE on its segment boundaries at
    guidance 1) samples with its own steps, guidance, grid and MagCache instead of ``num_steps``."""
    seed: int = 0
    """Seed of prompt k is ``seed + k`` for both models; also seeds the plan."""
    device: str = "cpu"
    """Torch device for generation."""

    def __post_init__(self) -> None:
        if self.subset_size < 1:
            raise ValueError(f"subset_size must be >= 1, got {self.subset_size}")
        if self.overlap > len(set(self.annotators)):
            raise ValueError(f"overlap {self.overlap} needs at least {self.overlap} annotators, "
                             f"got {len(set(self.annotators))}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be positive, got {self.height}x{self.width}")


@dataclass
class BatchResult:
    """What ``build_batch`` wrote."""

    plan: Plan
    plan_path: Path
    media_dir: Path
    kind: str
    height: int
    width: int
    pairs: int
    golden_pairs: int
    under_covered: dict[str, int] = field(default_factory=dict)


def common_size(height: int, width: int, multiples: Sequence[int]) -> tuple[int, int]:
    """The smallest (height, width) >= the request that is a multiple of every model's ``size_multiple``."""
    m = math.lcm(*multiples)
    return max(m, math.ceil(height / m) * m), max(m, math.ceil(width / m) * m)


def load_prompts(prompt_set: str, limit: int) -> list:
    from evaluation.prompts import load_moviegen, load_parti

    if prompt_set == "moviegen":
        return load_moviegen(limit)
    if prompt_set == "parti":
        return load_parti(limit)
    raise ValueError(f"unknown prompt set {prompt_set!r}")


def _free(pipe: object) -> None:
    import torch

    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def size_multiple(model_dir: Path, device: str) -> int:
    """``K5Pipeline.size_multiple`` of a pipeline folder (loads it, then frees it)."""
    from k5model.pipeline import K5Pipeline

    pipe = K5Pipeline.from_pretrained(model_dir, device=device)
    multiple = pipe.size_multiple
    _free(pipe)
    return multiple


def generate_side(model_dir: Path, prompts: Sequence, settings: BatchSettings, size: tuple[int, int], out: Path,
                  tag: str, log: Log) -> tuple[str, dict[int, str], dict[int, np.ndarray]]:
    """Generate every prompt with one model (seed ``settings.seed + k`` for prompt k) into ``out``.
    Returns (media kind, {k: file name}, {k: uint8 frames})."""
    from k5model.media import save_media
    from k5model.pipeline import K5Pipeline

    pipe = K5Pipeline.from_pretrained(model_dir, device=settings.device)
    kind, ext = ("video", ".mp4") if pipe.is_video else ("image", ".png")
    paths: dict[int, str] = {}
    frames: dict[int, np.ndarray] = {}
    own = settings.own_sampling and pipe.sampling is not None
    steps = None if own else settings.num_steps  # None: the folder's own step count, grid and guidance
    if own:
        log(f"{tag}: sampling with the folder's own settings ({pipe.sampling.kind}, {pipe.sampling.num_steps} steps, "
            f"guidance {pipe.sampling.guidance_scale:g})")
    for k, rec in enumerate(prompts):
        res = pipe.generate(rec.prompt, height=size[0], width=size[1],
                            num_frames=settings.num_frames if pipe.is_video else None, num_steps=steps,
                            seed=settings.seed + k, progress=False)
        rel = f"p{k:04d}_{tag}{ext}"
        save_media(res.frames if pipe.is_video else res.frames[0], out / rel)
        paths[k], frames[k] = rel, res.frames
        log(f"{tag}: generated {k + 1}/{len(prompts)}")
    _free(pipe)  # one model in memory at a time
    return kind, paths, frames


def golden_items(comparison: str, prompts: Sequence, kind: str, paths_a: dict[int, str],
                 frames_a: dict[int, np.ndarray], settings: BatchSettings, media: Path) -> list[PlanItem]:
    """Rater checks built from model A's generations: identical = the same file on both sides; degraded = a blurred,
    noisy copy on a side drawn at random."""
    from k5model.media import save_media

    ext = ".mp4" if kind == "video" else ".png"
    items = []
    for g, (gkind, better) in enumerate(golden_specs(settings.golden_identical, settings.golden_degraded,
                                                     seed=settings.seed)):
        k = g % len(prompts)
        good = paths_a[k]
        if gkind == "identical":
            items.append(PlanItem(f"{comparison}-golden{g}", prompts[k].prompt, good, good, kind, "identical"))
            continue
        bad = f"golden{g}_degraded{ext}"
        worse = degrade_frames(frames_a[k], seed=settings.seed + g)
        save_media(worse if kind == "video" else worse[0], media / bad)
        a, b = (good, bad) if better == "A" else (bad, good)
        items.append(PlanItem(f"{comparison}-golden{g}", prompts[k].prompt, a, b, kind, "degraded", better))
    return items


def archive_stale_judgments(root: Path, new_plan_json: str) -> Path | None:
    """When a batch is regenerated with different media or plan, its old judgments judge other clips: move the old
    store and plan to ``archive/<UTC time>/`` (nothing is deleted) so the annotation app starts fresh. A re-run that
    produces the same plan keeps the store. Returns the archive folder, if one was made."""
    old_plan, store = root / "plan.json", root / "judgments.duckdb"
    if not store.exists() or not old_plan.exists() or old_plan.read_text() == new_plan_json:
        return None
    dest = root / "archive" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    dest.mkdir(parents=True)
    for f in (store, store.with_suffix(".duckdb.wal"), old_plan):
        if f.exists():
            f.replace(dest / f.name)
    return dest


def publish_batch(store: object, result: BatchResult, prefix: str) -> str:
    """Copy the batch's media and plan to the object store under ``prefix``; returns the plan's URI."""
    for name in result.plan.meta["media_sha256"]:
        store.put_file(result.media_dir / name, f"{prefix}/media/{name}")
    return store.put_file(result.plan_path, f"{prefix}/plan.json")


def build_batch(comparison: Comparison, model_dirs: tuple[Path, Path], root: Path, settings: BatchSettings,
                log: Log = print, prompts: Sequence | None = None,
                refs: tuple[str, str] | None = None) -> BatchResult:
    """Generate model A and B on the same prompts and seeds, add golden pairs, write ``plan.json`` under ``root``.

    ``refs`` are the two models' lineage names as the release gate matches them (default: the comparison's own;
    an alias such as ``sft:pretrain`` is recorded as the stage it stands for).

    ``prompts`` defaults to the first ``settings.subset_size`` of the comparison's prompt set. The generation size
    is the requested size rounded up to one both models accept."""
    key = comparison.key
    prompts = list(prompts) if prompts is not None else load_prompts(comparison.prompt_set, settings.subset_size)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    size = common_size(settings.height, settings.width, [size_multiple(d, settings.device) for d in model_dirs])
    if size != (settings.height, settings.width):
        log(f"generation size {size[0]}x{size[1]} "
            f"(requested {settings.height}x{settings.width}; both models accept it)")
    kind, paths_a, frames_a = generate_side(model_dirs[0], prompts, settings, size, media, "a", log)
    kind_b, paths_b, _ = generate_side(model_dirs[1], prompts, settings, size, media, "b", log)
    if kind != kind_b:
        raise ValueError(f"{key}: cannot compare a {kind} model ({comparison.model_a}) with a {kind_b} model "
                         f"({comparison.model_b})")
    items = [PlanItem(f"{key}-{rec.id}", rec.prompt, paths_a[k], paths_b[k], kind=kind, seed=settings.seed + k)
             for k, rec in enumerate(prompts)]
    golden = golden_items(key, prompts, kind, paths_a, frames_a, settings, media)
    plan = build_plan(items + golden, settings.annotators, overlap=settings.overlap, seed=settings.seed)
    ref_a, ref_b = refs or (str(comparison.model_a), str(comparison.model_b))
    plan.meta = {"comparison": key, "model_a": comparison.model_a.name, "model_b": comparison.model_b.name,
                 "model_a_ref": ref_a, "model_b_ref": ref_b,
                 "model_a_dir": str(model_dirs[0]), "model_b_dir": str(model_dirs[1]),
                 "prompt_set": comparison.prompt_set,
                 "generation": {**asdict(settings), "annotators": list(settings.annotators), "height": size[0],
                                "width": size[1]}}
    used = sorted({m for i in plan.items for m in (i.media_a, i.media_b)})
    plan.meta["media_sha256"] = {m: hashlib.sha256((media / m).read_bytes()).hexdigest() for m in used}
    plan_path = root / "plan.json"
    archive_stale_judgments(root, plan.to_json())
    tmp = plan_path.with_suffix(".json.tmp")
    tmp.write_text(plan.to_json())
    tmp.replace(plan_path)  # a reader never sees half a plan
    return BatchResult(plan=plan, plan_path=plan_path, media_dir=media, kind=kind, height=size[0], width=size[1],
                       pairs=len(items), golden_pairs=len(golden),
                       under_covered=under_covered(coverage(plan), plan.overlap, plan.golden_map()))
