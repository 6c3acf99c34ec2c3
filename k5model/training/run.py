"""Entry point: ``python -m k5model.training.run --stage tiny_demo --out DIR --steps N [--resume]``.

Works alone (one process) or under ``torchrun --nproc-per-node K`` (gloo on CPU, nccl on GPU). Rank 0 prints one JSON
line per step (``{"step", "loss", "grad_norm", "lr", ...}``); floats are printed with repr so they round-trip exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from k5model.checkpoint import save_single_file, save_transformer_folder
from k5model.config import get_preset
from k5model.crossdit import CrossDiT
from k5model.training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from k5model.training.config import get_stage
from k5model.training.parallel import apply_activation_checkpointing, apply_fsdp, training_mesh
from k5model.training.throughput import ThroughputMeter
from k5model.training.trainer import SyntheticLatentSource, Trainer


class JsonLinePrinter:
    """One JSON line per step on stdout, with the wall time since the previous step (the trainer reads the loss back
    every step, so the device is synchronised and the time is real)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        # ThroughputMeter's step time (optimiser step only) when it ran; else the time between two printed steps
        print(json.dumps({"step": step, "step_time_s": now - self.last, **metrics}), flush=True)
        self.last = now


class PeriodicCheckpoint:
    def __init__(self, trainer: Trainer, directory: Path, every: int, keep: int):
        self.trainer, self.directory, self.every, self.keep = trainer, directory, every, keep

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.every > 0 and step % self.every == 0:
            save_checkpoint(self.trainer, self.directory, keep=self.keep)


def _init_distributed() -> tuple[int, int]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # plain `python -m`: a one-process group so the same FSDP/DCP code path runs
        # An in-process store: no TCP port to pick (concurrent runs cannot race for one), and no RANK/MASTER_* left in
        # os.environ, where subprocesses started later by the same process (tests, `k5 train`) would inherit them.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


class JsonLineFile:
    """metrics.jsonl beside the checkpoints: what the orchestration layer reads back and logs (rank 0 only)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def resolve_stage(name: str, demo: bool, real_data: bool = False, **overrides: Any):
    """A named StageConfig, or a report Table 4 row (``--demo`` scales it to the tiny preset for CPU; full scale only
    with ``real_data``: latent shards instead of synthetic batches)."""
    from k5model.training.stages import TABLE4, demo_scaling, get_table_stage

    if name in TABLE4:
        if not demo and not real_data:
            raise SystemExit(f"stage {name!r} is a full-scale Table 4 stage; pass --demo for its CPU-sized version "
                             "or --shards/--store to train it on latent shards")
        stage = demo_scaling(name) if demo else get_table_stage(name).to_stage_config(edit_as="t2i")
        return stage.replace(**overrides) if overrides else stage
    return get_stage(name, **overrides)


def shard_source(args: argparse.Namespace, stage: Any, rank: int, world: int, device: torch.device, cfg: Any) -> Any:
    """``k5data.loading.training_source.ShardLatentSource`` over --shards in --store (k5data imported only here)."""
    from k5data.loading.training_source import ShardLatentSource, TextEncoders
    from k5data.object_store import open_store

    text = TextEncoders.from_pretrained(args.text_encoders, device=device,
                                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if (text.text_dim, text.pooled_dim) != (cfg.in_text_dim, cfg.in_text_dim2):
        raise SystemExit(f"--text-encoders {args.text_encoders}: Qwen/CLIP widths {text.text_dim}/{text.pooled_dim} "
                         f"do not match the model's in_text_dim/in_text_dim2 {cfg.in_text_dim}/{cfg.in_text_dim2}")
    return ShardLatentSource(open_store(args.store), args.shards, stage, text, t_max=args.t_max, rank=rank,
                             world_size=world, visual_cond=cfg.visual_cond, device=device)


def main(argv: list[str] | None = None, callbacks: list[Any] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stage", default="tiny_demo")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="train until this step (default: the stage's steps)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--offload-activations", action="store_true",
                   help="activation checkpointing with each block's saved inputs in pinned host memory (§6.1.3)")
    p.add_argument("--replicate", type=int, default=1,
                   help="HSDP: N replica groups, each sharding the model over world/N ranks (1 = plain FSDP)")
    p.add_argument("--sample-every", type=int, default=None,
                   help="generate the validation prompts with the EMA weights every N steps and at the last step "
                        "(0 = last step only) into OUT/samples/step_<N>; needs --sample-pipeline")
    p.add_argument("--sample-pipeline", type=Path, default=None,
                   help="pipeline folder whose text encoders and VAE the samples use (its transformer is ignored)")
    p.add_argument("--sample-prompts", type=Path, default=None, help="text file, one validation prompt a line")
    p.add_argument("--sample-steps", type=int, default=25, help="sampler steps of a validation sample")
    p.add_argument("--sample-cache", type=Path, default=None,
                   help="folder keeping the validation prompts' text encodings across runs (skips the encoders)")
    p.add_argument("--no-export", action="store_true", help="skip writing OUT/ema/transformer at the end")
    p.add_argument("--demo", action="store_true", help="run a Table 4 stage scaled to the tiny preset (CPU)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from these weights (the parent stage's OUT/ema/transformer, or a released checkpoint: "
                        "a diffusers transformer folder or an official single file)")
    p.add_argument("--preset", default=None, help="model preset instead of the stage's (e.g. video_lite on GPUs)")
    p.add_argument("--latent-size", default=None, help="HxW latent size of every sample, e.g. 64x96 for 512x768")
    p.add_argument("--frames", type=int, default=None, help="latent frames of a video sample (31 = 5 s)")
    p.add_argument("--batch", type=int, default=None, help="samples per rank and step")
    p.add_argument("--text-len", type=int, default=6, help="text tokens of the synthetic condition (256 = Qwen max)")
    p.add_argument("--tasks", default=None, help="task mix override, e.g. t2v=1")
    p.add_argument("--shards", default=None, metavar="PREFIX",
                   help="train on the latent shards under PREFIX in --store (k5 latents) instead of synthetic batches")
    p.add_argument("--store", default=None, metavar="URI", help="object store of --shards: folder or s3://bucket/prefix")
    p.add_argument("--text-encoders", type=Path, default=None,
                   help="pipeline folder whose Qwen/CLIP encoders embed the shard captions on the fly (with --shards)")
    p.add_argument("--t-max", type=int, default=None,
                   help="latent frames packed per step and rank (with --shards; default batch x frames)")
    args = p.parse_args(argv)
    if args.shards and (args.store is None or args.text_encoders is None):
        p.error("--shards needs --store URI (where the shards are) and --text-encoders DIR (a pipeline folder with "
                "text_encoder/ and text_encoder_2/)")

    rank, world = _init_distributed()
    overrides: dict[str, Any] = {"bf16": True} if args.bf16 else {}
    if args.preset:
        overrides["model_preset"] = args.preset
    if args.latent_size:
        overrides["resolutions"] = {args.latent_size: 1.0}
    if args.frames:
        overrides["frames"] = args.frames
    if args.batch:
        overrides["batch"] = args.batch
    if args.tasks:
        overrides["tasks"] = {k: float(v) for k, v in (kv.split("=") for kv in args.tasks.split(","))}
    if args.activation_checkpointing or args.offload_activations:
        overrides["activation_checkpointing"] = True
    if args.sample_every is not None and args.sample_pipeline is None:
        raise SystemExit("--sample-every needs --sample-pipeline DIR (the text encoders and VAE to generate with)")
    if args.seed is not None:
        overrides["seed"] = args.seed
    stage = resolve_stage(args.stage, args.demo, bool(args.shards), **overrides)
    steps = args.steps if args.steps is not None else stage.steps
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    torch.manual_seed(stage.seed)  # same initial weights on every rank before sharding
    model = CrossDiT(get_preset(stage.model_preset, attention_type=stage.attention)).to(device)
    if args.init is not None and not (args.resume and latest_checkpoint(args.out / "checkpoints") is not None):
        # attention settings are the stage's own: a parent trained dense may continue with NABLA
        parent = CrossDiT.from_pretrained(args.init, config=model.config if args.init.is_file() else None)
        model.load_state_dict(parent.state_dict(), strict=True)
    if stage.activation_checkpointing:
        apply_activation_checkpointing(model, offload=args.offload_activations)
    mesh = training_mesh(world, args.replicate, device.type)  # None = FSDP over all ranks; 2-D = HSDP
    apply_fsdp(model, mesh=mesh, param_dtype=torch.bfloat16 if stage.bf16 and device.type == "cuda" else None)

    cfg = model.config
    data = shard_source(args, stage, rank, world, device, cfg) if args.shards else SyntheticLatentSource(stage, rank=rank, in_channels=cfg.in_visual_dim, text_dim=cfg.in_text_dim,
                                 pooled_dim=cfg.in_text_dim2, max_text_len=args.text_len)
    trainer = Trainer(model, stage, data, data.null_condition(), rank=rank, device=device)
    ckpt_dir = args.out / "checkpoints"
    resumed_from = None
    if args.resume and (latest := latest_checkpoint(ckpt_dir)) is not None:
        resumed_from = load_checkpoint(trainer, latest)
    meter = ThroughputMeter(trainer)  # every rank: its counts are reduced across ranks
    trainer.callbacks.append(meter)
    if args.sample_every is not None:
        from k5model.training.samples import DEFAULT_PROMPTS, SampleGenerator, read_prompts

        prompts = read_prompts(args.sample_prompts) if args.sample_prompts else list(DEFAULT_PROMPTS)
        trainer.callbacks.append(SampleGenerator(trainer, args.sample_pipeline, args.out / "samples",
                                                 every=args.sample_every, prompts=prompts, final_step=steps,
                                                 num_steps=args.sample_steps, seed=stage.seed, rank=rank,
                                                 cache_dir=args.sample_cache))
    if rank == 0:
        print(json.dumps({"event": "start", "stage": stage.name, "world_size": world, "resumed_from": resumed_from,
                          "mesh": None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape))}), flush=True)
        trainer.callbacks.append(JsonLinePrinter())
        trainer.callbacks.append(JsonLineFile(args.out / "metrics.jsonl"))
        trainer.callbacks.extend(callbacks or [])
    trainer.callbacks.append(PeriodicCheckpoint(trainer, ckpt_dir, args.ckpt_every, args.keep))
    trainer.callbacks.append(meter.end)  # the next step's clock starts after checkpoints and samples

    trainer.train(steps)
    if args.ckpt_every > 0 and trainer.step % args.ckpt_every:
        save_checkpoint(trainer, ckpt_dir, keep=args.keep)
    if not args.no_export:
        ema = trainer.ema.full_state_dict()  # collective
        if rank == 0:
            export = CrossDiT(cfg)
            export.load_state_dict(ema, strict=True)
            save_transformer_folder(export, args.out / "ema" / "transformer")
            save_single_file(export, args.out / "ema" / f"{stage.name}.safetensors")  # official single-file layout
    if rank == 0:
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        print(json.dumps({"event": "done", "step": trainer.step, "peak_mem_gib": peak}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return {"step": trainer.step, "stage": stage.name, "world_size": world, "resumed_from": resumed_from}


if __name__ == "__main__":
    main(sys.argv[1:])
