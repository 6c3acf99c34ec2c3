"""How the RL post-training assets run (report §6.6): reward pairs from the lineage models, and the two training jobs
(relative reward model, DRaFT-K) launched through Dagster Pipes the way the training stages are (a subprocess, or a GPU
pod from ``TrainingJobResource``'s pod settings), each with an MLflow run under the ``rl`` lineage run.

Reward pairs (no human labels): for each SFT item, its caption is the prompt; the pre-trained model (the stage the SFT
soup started from) and the SFT soup each generate one image with the same seed, and the real SFT image (a video item:
its first frame) is resized to the same size. Order: pretrain < sft < real; the three (better, worse) pairs are stored
in both positions, (A, B) with label 1 and (B, A) with label 0, with which model made each side. Items are split into
train and val by a hash of their source media id (held-out prompts of DRaFT-K are the val items).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from k5model.rl.jobs import PAIR_COLUMNS, SOURCES_WORST_TO_BEST, DraftTrainJob, RewardTrainJob
from orchestration.stage_runs import hold_stage, publish, work_dir

RL_CHAIN = "rl"  # MLflow lineage run the reward and RL runs nest under
KINDS = {"reward": RewardTrainJob, "draft": DraftTrainJob}


@dataclass(frozen=True, kw_only=True)
class PairSettings:
    """How the heuristic pairs are generated."""

    height: int = 64
    """Image height of the generations and the resized real image."""
    width: int = 64
    """Image width."""
    num_steps: int = 4
    """Sampler steps of both generations."""
    guidance_scale: float = 5.0
    """CFG weight of both generations."""
    val_fraction: float = 0.4
    """Share of the items held out (reward validation, DRaFT held-out prompts); at least one each side."""
    max_items: int | None = None
    """Use at most this many SFT items (None: all)."""
    seeds_per_item: int = 1
    """Generations per item and model (each gives its own three pairs against the same real image)."""
    seed: int = 0
    """Generation j of item k uses seed + k * seeds_per_item + j, the same for both models."""


def _real_image(row: Mapping[str, Any], height: int, width: int):
    from k5data.latents.media import load_image, load_video_frames, resize_cover_crop

    path = Path(str(row["media_path"]))
    rgb = load_video_frames(path, [0])[0] if row["kind"] == "video" else load_image(path)
    return resize_cover_crop(rgb, height, width)


def split_items(item_ids: list[str], val_fraction: float) -> dict[str, str]:
    """train/val per key (an item's source media) by a hash of it (stable across re-runs); at least one of each."""
    if len(item_ids) < 2:
        raise ValueError(f"reward pairs need SFT items from at least 2 media (one train, one val), got "
                         f"{len(item_ids)}")
    ranked = sorted(item_ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
    n_val = min(len(ranked) - 1, max(1, round(len(ranked) * val_fraction)))
    return {i: "val" if k < n_val else "train" for k, i in enumerate(ranked)}


def build_reward_pairs(rows: list[dict[str, Any]], pretrain_dir: str | Path, sft_dir: str | Path, out: Path,
                       settings: PairSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate both models' images for every SFT item, write the images and ``pairs.parquet``; returns a summary."""
    import pandas as pd
    from PIL import Image

    from k5model.pipeline import K5Pipeline

    rows = sorted((r for r in rows if str(r.get("caption") or "").strip()), key=lambda r: str(r["item_id"]))
    rows = rows[:settings.max_items] if settings.max_items else rows
    # split by source media: two scenes of one video share their look, so they stay on the same side
    by_media = split_items(sorted({str(r.get("media_id") or r["item_id"]) for r in rows}), settings.val_fraction)
    split = {str(r["item_id"]): by_media[str(r.get("media_id") or r["item_id"])] for r in rows}
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    n = settings.seeds_per_item
    paths: dict[tuple[str, int], dict[str, str]] = {(str(r["item_id"]), j): {} for r in rows for j in range(n)}
    for source, folder in (("pretrain", pretrain_dir), ("sft", sft_dir)):
        pipe = K5Pipeline.from_pretrained(folder)
        for k, r in enumerate(rows):
            for j in range(n):
                res = pipe.generate(str(r["caption"]), height=settings.height, width=settings.width,
                                    num_frames=1 if pipe.is_video else None, num_steps=settings.num_steps,
                                    guidance_scale=settings.guidance_scale, seed=settings.seed + k * n + j,
                                    progress=False)
                path = images / f"{r['item_id']}.{j}.{source}.png"
                Image.fromarray(res.frames[0]).save(path)
                paths[str(r["item_id"]), j][source] = str(path)
        log(f"reward pairs: {len(rows) * n} images from {source} ({folder})")
    for r in rows:
        path = images / f"{r['item_id']}.real.png"
        Image.fromarray(_real_image(r, settings.height, settings.width)).save(path)
        for j in range(n):
            paths[str(r["item_id"]), j]["real"] = str(path)
    table, by_item = [], {str(r["item_id"]): r for r in rows}
    for (item, j), p in paths.items():
        r = by_item[item]
        for hi in range(len(SOURCES_WORST_TO_BEST)):
            for lo in range(hi):
                better, worse = SOURCES_WORST_TO_BEST[hi], SOURCES_WORST_TO_BEST[lo]
                for first, second, label in ((better, worse, 1), (worse, better, 0)):
                    table.append({"item_id": item, "prompt": str(r["caption"]), "split": split[item],
                                  "first_path": p[first], "second_path": p[second], "first_source": first,
                                  "second_source": second, "label": label, "seed_index": j,
                                  "kind": str(r["kind"]), "domain": str(r.get("domain") or "")})
    frame = pd.DataFrame(table, columns=[*PAIR_COLUMNS, "seed_index", "kind", "domain"])
    frame.to_parquet(out / "pairs.parquet", index=False)
    summary = {"items": len(rows), "pairs": len(frame), "train_items": sum(v == "train" for v in split.values()),
               "val_items": sum(v == "val" for v in split.values()), "order": " < ".join(SOURCES_WORST_TO_BEST),
               "settings": asdict(settings)}
    (out / "pairs.json").write_text(json.dumps(summary, indent=2))
    return summary


def rl_command(kind: str, job: RewardTrainJob | DraftTrainJob, python: str = sys.executable) -> list[str]:
    """The job-side command (``orchestration.pipes_rl``), the RL counterpart of ``training_jobs.training_command``."""
    if kind not in KINDS:
        raise ValueError(f"RL job kind {kind!r} is not one of {sorted(KINDS)}")
    return [python, "-m", "orchestration.pipes_rl", "--kind", kind, "--job", job.to_json()]


def run_rl_job(context: dg.AssetExecutionContext, training_job: Any, kind: str, job: RewardTrainJob | DraftTrainJob,
               env: Mapping[str, str]) -> dict[str, Any]:
    """Run one RL job through Pipes on the training resource's backend (a subprocess, or one pod with one GPU:
    image_lite DRaFT-K and the 7B reward model fit one H200, docs/rl.md); returns the job's reported metadata."""
    command = functools.partial(rl_command, kind)
    done = training_job.run_command(context, command, job, env, gpus=1, label="k5-rl")
    reported = done.get_materialize_result().metadata
    return {k: getattr(v, "value", v) for k, v in reported.items()}


def run_tracked(context: dg.AssetExecutionContext, mlflow: Any, training_job: Any, kind: str,
                job: RewardTrainJob | DraftTrainJob, final: Path, tags: dict[str, str],
                finish: Callable[[Path], None] | None = None) -> tuple[dict[str, Any], str]:
    """The job (writing into ``job.out``, which must be ``stage_runs.work_dir(final)``) under its MLflow run (params =
    the job spec; metrics logged live by the job), then ``finish(work)`` (e.g. a pipeline export), then the folder
    published as ``final`` - all under the asset's one-writer lease: (summary, run link)."""
    import shutil

    work = Path(job.out)
    if work != work_dir(final):
        raise ValueError(f"an RL job must write into {work_dir(final)} (stage_runs.work_dir), not {work}")
    asset = context.asset_key.to_user_string()
    with hold_stage(final, f"Dagster run {context.run_id}", asset=asset) as lease:
        shutil.rmtree(work, ignore_errors=True)  # RL jobs do not resume: each attempt starts afresh
        params = {f"job.{k}": v for k, v in asdict(job).items()}
        run_id = mlflow.start_stage_run(RL_CHAIN, f"{RL_CHAIN}/{final.name}", context.run_id, params,
                                        {"dagster_asset": asset, **tags})
        env = {"MLFLOW_TRACKING_URI": mlflow.resolved_tracking_uri(), "K5_MLFLOW_RUN_ID": run_id}
        try:
            run_rl_job(context, training_job, kind, job, env)
            if finish is not None:
                finish(work)
        except BaseException:
            mlflow.end_stage_run(run_id, failed=True)
            raise
        summary = json.loads((work / "summary.json").read_text())
        summary = {k: v.replace(str(work), str(final)) if isinstance(v, str) else v for k, v in summary.items()}
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        lease.check()
        publish(work, final)
    url = mlflow.end_stage_run(run_id, tags={f"k5_{k}": str(v)[:5000] for k, v in summary.items()
                                             if k.startswith(("selected", "heldout"))})
    return {**summary, "mlflow_run_id": run_id}, url


def export_rl_pipeline(out: Path, policy_pipeline: str | Path) -> Path:
    """The RL policy as a complete pipeline folder (the stages' export: trained transformer + the base's frozen
    parts linked)."""
    from k5model.checkpoint import assemble_pipeline_folder

    return assemble_pipeline_folder(policy_pipeline, out / "transformer", out / "pipeline")


def tiny_reward_base(paths: Any, pipeline: str) -> Path:
    """The demo's reward model start: a tiny random Qwen2.5-VL built once under ``models/tiny_reward`` from the
    pipeline's tokenizer (same class and ``from_pretrained`` path as the 7B)."""
    from k5model.rl.reward import build_tiny_reward_model

    return build_tiny_reward_model(paths.models / "tiny_reward", tokenizer_dir=Path(pipeline) / "tokenizer")
