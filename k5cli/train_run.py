"""The training composition root: a ``TrainJob`` in, a trained and exported stage out.

``python -m k5cli.train_run --job JOB`` (JOB: a JSON file or inline JSON of ``k5model.training.job.TrainJob``), alone
or under ``torchrun`` (gloo on CPU, NCCL on GPU); ``k5 train`` and the Dagster Pipes job call ``run_training`` with the
same job. It wires model (k5model), data (k5data shards or the synthetic fixture), parallelism, checkpoints and
callbacks; the logic lives in those libraries. Rank 0 prints one JSON line per step (floats round-trip exactly).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist

from k5cli.main import K5Error
from k5cli.train import job_options
from k5model.checkpoint import assemble_pipeline_folder, save_single_file, save_transformer_folder
from k5model.config import get_preset
from k5model.crossdit import CrossDiT, widen_to_visual_cond
from k5model.training.checkpointing import (
    AsyncCheckpointer,
    CheckpointException,
    CheckpointWriteError,
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from k5model.training.config import StageConfig, get_stage
from k5model.training.job import TrainJob, parse_mix
from k5model.training.parallel import (
    apply_activation_checkpointing,
    apply_fsdp,
    apply_sequence_parallel,
    data_parallel_rank,
    fsdp_mesh,
    sp_mesh,
    training_mesh,
)
from k5model.training.throughput import ThroughputMeter
from k5model.training.trainer import SyntheticLatentSource, Trainer

STEP_SLEEP_ENV = "K5_TRAIN_STEP_SLEEP_S"


class JsonLinePrinter:
    """One JSON line per step on stdout with the wall time since the previous one (the trainer reads the loss back
    every step, so the device is synchronised and the time is real)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        print(json.dumps({"step": step, "step_time_s": now - self.last, **metrics}), flush=True)
        self.last = now


class JsonLineFile:
    """metrics.jsonl beside the checkpoints: what the orchestration layer reads back (rank 0 only). A resumed run
    drops the lines of steps after its checkpoint, so the file holds each step once."""

    def __init__(self, path: Path, resumed_step: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resumed_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class StepPause:
    """Test hook (``K5_TRAIN_STEP_SLEEP_S``): pause after each step so a kill test can land mid-stage."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        time.sleep(self.seconds)


class PeriodicCheckpoint:
    """Saves every ``every`` steps, synchronously or through an ``AsyncCheckpointer``, and adds ``ckpt_stall_s`` (the
    seconds this rank's training was held by the save) to that step's metrics."""

    def __init__(self, trainer: Trainer, directory: Path, every: int, keep: int, async_save: bool = False):
        self.trainer, self.directory, self.every, self.keep = trainer, directory, every, keep
        self.checkpointer = AsyncCheckpointer(trainer, directory, keep) if async_save else None

    def save(self) -> float:
        """Save the current step now; the stall in seconds."""
        if self.checkpointer is not None:
            return self.checkpointer.save()
        t0 = time.perf_counter()
        save_checkpoint(self.trainer, self.directory, keep=self.keep)
        return time.perf_counter() - t0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.every > 0 and step % self.every == 0:
            metrics["ckpt_stall_s"] = self.save()

    def close(self) -> None:
        """Wait for a save in flight (raising its error) and release the checkpoint thread."""
        if self.checkpointer is not None:
            self.checkpointer.close()


def init_distributed() -> tuple[int, int]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # plain `python -m`: a one-process group so the same FSDP/DCP code path runs
        # An in-process store: no TCP port to pick, and no RANK/MASTER_* left in os.environ for later subprocesses.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def resolve_stage(job: TrainJob) -> StageConfig:
    """The job's StageConfig: a named stage, or a Table 4 row (``demo`` scales it to the tiny preset; full scale only
    on latent shards), with the job's overrides applied."""
    from k5model.training.stages import TABLE4, demo_scaling, get_table_stage

    s = job.stage
    overrides: dict[str, Any] = {k: v for k, v in {
        "model_preset": s.preset, "frames": s.frames, "batch": s.batch, "lr": s.lr, "seed": s.seed,
        "attention": s.attention,
        "resolutions": {s.latent_size: 1.0} if s.latent_size else None,
        "tasks": parse_mix(s.tasks) if s.tasks else None, "bf16": s.bf16 or None,
        "activation_checkpointing": job.parallel.activation_checkpointing or None}.items() if v is not None}
    if s.stage not in TABLE4:
        return get_stage(s.stage, **overrides)
    if not s.demo and job.data.shards is None:
        raise SystemExit(f"stage {s.stage!r} is a full-scale Table 4 stage; pass --demo for its CPU-sized version "
                         "or --shards/--store to train it on latent shards")
    stage = demo_scaling(s.stage) if s.demo else get_table_stage(s.stage).to_stage_config()
    return stage.replace(**overrides) if overrides else stage


def build_model(job: TrainJob, stage: StageConfig, device: torch.device, world: int) -> tuple[CrossDiT, Any]:
    """The stage's CrossDiT, initialised from ``init`` unless a checkpoint will be resumed, parallelised; and its
    device mesh (None = FSDP over all ranks; 2-D = HSDP; a last dim ``sp`` = Ulysses sequence parallel)."""
    torch.manual_seed(stage.seed)  # same initial weights on every rank before sharding
    model = CrossDiT(get_preset(stage.model_preset, attention_type=stage.attention)).to(device)
    out = Path(job.checkpoint.out)
    init = job.init.init
    if init and not (job.checkpoint.resume and latest_checkpoint(out / "checkpoints") is not None):
        # attention settings are the stage's own: a parent trained dense may continue with NABLA
        try:
            parent = _load_parent(init, model.config)
            # an editing stage from its T2I parent: the condition + mask input channels start at zero
            model.load_state_dict(widen_to_visual_cond(parent.state_dict(), model.config), strict=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # missing, truncated or another model's weights
            raise K5Error(f"--init {init}: cannot initialise the {stage.model_preset} model from it ({_first(exc)}); "
                          "pass the parent stage's exported ema/transformer folder, a pipeline folder or its "
                          ".safetensors file") from None
    if stage.activation_checkpointing:
        apply_activation_checkpointing(model, offload=job.parallel.offload_activations)
    mesh = training_mesh(world, job.parallel.replicate, device.type, job.parallel.sequence_parallel)
    apply_fsdp(model, mesh=fsdp_mesh(mesh),
               param_dtype=torch.bfloat16 if stage.bf16 and device.type == "cuda" else None)
    if sp_mesh(mesh) is not None:
        apply_sequence_parallel(model, sp_mesh(mesh))
    return model, mesh


def _load_parent(init: str, config: Any) -> CrossDiT:
    """The parent's weights: a folder with its own config; a single file (no config inside) as this model, or as
    its text-to-image form when this is a ``visual_cond`` model started from a T2I file."""
    if not Path(init).is_file():
        return CrossDiT.from_pretrained(init)
    try:
        return CrossDiT.from_pretrained(init, config=config)
    except (ValueError, KeyError, RuntimeError):
        if not config.visual_cond:
            raise
        return CrossDiT.from_pretrained(init, config=config.replace(visual_cond=False))


def build_data(job: TrainJob, stage: StageConfig, cfg: Any, rank: int, world: int, device: torch.device) -> Any:
    """Latent shards from the object store (k5data), or the synthetic fixture when no shards are named."""
    if job.data.shards is None:
        return SyntheticLatentSource(stage, rank=rank, in_channels=cfg.in_visual_dim, text_dim=cfg.in_text_dim,
                                     pooled_dim=cfg.in_text_dim2, max_text_len=job.data.text_len,
                                     visual_cond=cfg.visual_cond)
    from k5data.loading.training_source import ShardLatentSource, TextEncoders
    from k5data.object_store import open_store

    try:
        text = TextEncoders.from_pretrained(job.data.text_encoders, device=device,
                                            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise K5Error(f"--text-encoders {job.data.text_encoders}: cannot load the Qwen/CLIP text encoders "
                      f"({_first(exc)}); pass a Kandinsky 5 pipeline folder with text_encoder/, tokenizer/, "
                      "text_encoder_2/ and tokenizer_2/") from None
    if (text.text_dim, text.pooled_dim) != (cfg.in_text_dim, cfg.in_text_dim2):
        raise SystemExit(f"text_encoders {job.data.text_encoders}: Qwen/CLIP widths {text.text_dim}/{text.pooled_dim} "
                         f"do not match the model's in_text_dim/in_text_dim2 {cfg.in_text_dim}/{cfg.in_text_dim2}")
    return ShardLatentSource(open_store(job.data.store), job.data.shards, stage, text, t_max=job.data.t_max,
                             rank=rank, world_size=world, visual_cond=cfg.visual_cond, device=device,
                             res_classes=job.data.classes(), prefetch=job.data.prefetch)


def _first(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def resume_point(job: TrainJob, rank: int) -> tuple[Path | None, list[dict[str, str]]]:
    """Collective. The newest verified checkpoint to resume (None: start fresh) and the newer ones skipped, each
    {"checkpoint", "reason"} (also said on stderr). Damaged checkpoints and nothing to fall back to: a K5Error."""
    if not job.checkpoint.resume:
        return None, []
    ckpt_dir = Path(job.checkpoint.out) / "checkpoints"
    point = resumable_checkpoint(ckpt_dir)
    if point.path is not None and point.skipped and rank == 0:
        print(f"resume: {point.describe()}", file=sys.stderr, flush=True)
    if point.path is None and point.skipped:
        raise K5Error(f"--resume: no checkpoint in {ckpt_dir} passes verification ({point.describe()}); move the "
                      "damaged step_* folders aside to train from the start, or restore them from a copy")
    return point.path, [{"checkpoint": name, "reason": why} for name, why in point.skipped]


def export(trainer: Trainer, job: TrainJob, stage: StageConfig, rank: int) -> None:
    """EMA weights as a diffusers transformer folder + the official single file, and with ``base_pipeline`` a
    complete pipeline folder (the frozen parts linked from the base)."""
    ema = trainer.ema.full_state_dict()  # collective
    if rank != 0:
        return
    out = Path(job.checkpoint.out)
    model = CrossDiT(trainer.model.config)
    model.load_state_dict(ema, strict=True)
    save_transformer_folder(model, out / "ema" / "transformer")
    save_single_file(model, out / "ema" / f"{stage.name}.safetensors")  # official single-file layout
    if job.checkpoint.base_pipeline:
        assemble_pipeline_folder(job.checkpoint.base_pipeline, out / "ema" / "transformer", out / "pipeline")


def attach_callbacks(trainer: Trainer, job: TrainJob, stage: StageConfig, rank: int, steps: int,
                     resumed_step: int, extra: list[Any]) -> PeriodicCheckpoint:
    out, samples = Path(job.checkpoint.out), job.samples
    meter = ThroughputMeter(trainer)  # every rank: its counts are reduced across ranks
    trainer.callbacks.append(meter)
    if samples.sample_every is not None:
        from k5model.training.samples import DEFAULT_PROMPTS, SampleGenerator, read_prompts

        prompts = read_prompts(samples.sample_prompts) if samples.sample_prompts else list(DEFAULT_PROMPTS)
        trainer.callbacks.append(SampleGenerator(
            trainer, samples.sample_pipeline, out / "samples", every=samples.sample_every, prompts=prompts,
            final_step=steps, num_steps=samples.sample_steps, seed=stage.seed, rank=rank,
            cache_dir=samples.sample_cache))
    ckpt = job.checkpoint
    # before the loggers, so a step's line carries its checkpoint stall
    periodic = PeriodicCheckpoint(trainer, out / "checkpoints", ckpt.ckpt_every, ckpt.keep, ckpt.async_checkpoint)
    trainer.callbacks.append(periodic)
    if rank == 0:
        trainer.callbacks += [JsonLinePrinter(), JsonLineFile(out / "metrics.jsonl", resumed_step), *extra]
    if os.environ.get(STEP_SLEEP_ENV):
        trainer.callbacks.append(StepPause(float(os.environ[STEP_SLEEP_ENV])))
    trainer.callbacks.append(meter.end)  # the next step's clock starts after checkpoints and samples
    return periodic


def run_training(job: TrainJob, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train ``job`` to its last step (resuming when asked and a checkpoint exists) and export it. A distillation
    job (``job.distill.distill``) runs its stage instead (``k5cli.distill_run``)."""
    if job.distill.distill is not None:
        from k5cli.distill_run import run_distill_job

        return run_distill_job(job, callbacks)
    rank, world = init_distributed()
    stage = resolve_stage(job)
    steps = job.stage.steps if job.stage.steps is not None else stage.steps
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    resume_from, skipped = resume_point(job, rank)  # verified before anything heavy is built
    model, mesh = build_model(job, stage, device, world)
    data_rank, data_world = data_parallel_rank(mesh, rank, world)  # a sequence-parallel group shares its batches
    data = build_data(job, stage, model.config, data_rank, data_world, device)
    trainer = Trainer(model, stage, data, data.null_condition(), rank=data_rank, device=device,
                      batch_replicas=world // data_world)
    resumed_from = None
    if resume_from is not None:
        try:
            resumed_from = load_checkpoint(trainer, resume_from, verify=False)  # resume_point has just verified it
        except (RuntimeError, ValueError, KeyError, CheckpointException) as exc:  # verified, but not this model's
            raise K5Error(f"checkpoint {resume_from} does not fit this job ({_first(exc)}); resume with the settings "
                          "it was trained with, or train into a new --out") from None
    periodic = attach_callbacks(trainer, job, stage, rank, steps, trainer.step, callbacks or [])
    if rank == 0:
        print(json.dumps({"event": "start", "stage": stage.name, "world_size": world, "resumed_from": resumed_from,
                          "skipped_checkpoints": skipped,
                          "mesh": None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape))}), flush=True)
    try:
        try:
            trainer.train(steps)
            if job.checkpoint.ckpt_every > 0 and trainer.step % job.checkpoint.ckpt_every:
                periodic.save()
        finally:
            periodic.close()  # the last save is complete (or its error raised) before export and exit
        if job.checkpoint.export:
            export(trainer, job, stage, rank)
    except CheckpointWriteError as exc:
        raise K5Error(str(exc)) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise K5Error(f"disk full while training ({exc.strerror}: {exc.filename}); free space or give --out a folder "
                      "on a larger disk, then rerun with --resume (the last complete checkpoint is kept)") from None
    if rank == 0:
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        print(json.dumps({"event": "done", "step": trainer.step, "peak_mem_gib": peak}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return {"step": trainer.step, "stage": stage.name, "world_size": world, "resumed_from": resumed_from,
            "skipped_checkpoints": skipped}


def load_job(text: str) -> TrainJob:
    """A job from inline JSON or a JSON file path."""
    if text.lstrip().startswith("{"):
        return TrainJob.from_json(text)
    path = Path(text)
    if not path.is_file():
        raise SystemExit(f"--job {text}: no such file (pass a TrainJob JSON file or inline JSON)")
    return TrainJob.from_json(path.read_text())


@click.command()
@click.option("--job", "job_text", default=None, help="TrainJob JSON file or inline JSON (other options ignored)")
@functools.partial(job_options, optional_out=True)
def main(job_text: str | None, **values: Any) -> None:
    """``python -m k5cli.train_run --job JOB`` or the flat TrainJob options of ``k5 train``; JSON lines out."""
    try:
        job = load_job(job_text) if job_text else TrainJob.from_flat(**values)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    run_training(job)


if __name__ == "__main__":
    main(prog_name="python -m k5cli.train_run")
