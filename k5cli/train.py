"""``k5 train`` (options generated from ``TrainJob``), ``k5 plan`` and ``k5 stages``: Table 4 stages and the §7.3
step-time / memory planner (no torch import at load time)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from k5model.training.planner import (
    GIB,
    H100_80GB_BYTES,
    MEASURED_REF_SECONDS,
    REF_HEIGHT,
    REF_PRESET,
    REF_SECONDS_OF_VIDEO,
    REF_WIDTH,
    Candidate,
    plan,
)
from k5model.training.stages import CHAINS, TABLE4, get_table_stage


@click.command("stages")
def stages() -> None:
    """List every Table 4 pre-training stage, chain by chain, with its parent."""
    click.echo(f"{'stage':<20} {'preset':<11} {'steps':>8} {'batch':>6} {'lr':>8} {'wd':>6} {'sec':>4} "
               f"{'attention':<9} parent")
    for chain, names in CHAINS.items():
        click.echo(f"# {chain}")
        for name in names:
            s = TABLE4[name]
            click.echo(f"{s.name:<20} {s.preset:<11} {s.steps:>8} {s.batch:>6} {s.lr:>8.1e} {s.weight_decay:>6g} "
                       f"{s.max_seconds:>4g} {s.attention:<9} {s.parent or '-'}")


@click.command("plan")
@click.argument("stage")
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="GPUs of the job.")
@click.option("--ref-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Measured seconds of one step of the reference configuration ({REF_PRESET}, batch 1, "
                   f"{REF_HEIGHT}x{REF_WIDTH}, {REF_SECONDS_OF_VIDEO} s, 1 GPU); ours: {MEASURED_REF_SECONDS}.")
@click.option("--batch-per-gpu", "batches", type=click.IntRange(min=1), multiple=True,
              help="Micro-batch sizes to try (repeatable; default 1 2 4 8).")
@click.option("--shard", "shards", type=click.IntRange(min=1), multiple=True,
              help="FSDP shard-group sizes to try (repeatable; default 1, 8 and --gpus where they divide it).")
def plan_cmd(stage: str, gpus: int, ref_seconds: float | None, batches: tuple[int, ...],
             shards: tuple[int, ...]) -> None:
    """Estimate step time and memory per GPU of STAGE (report §7.3, Eqs 1-2) for candidate batch/sharding settings."""
    try:
        table = get_table_stage(stage)
    except KeyError as err:
        raise click.BadParameter(err.args[0], param_hint="STAGE") from None
    bad = [s for s in shards if s > gpus or gpus % s]
    if bad:
        raise click.BadParameter(f"shard sizes {bad} must divide --gpus {gpus}", param_hint="--shard")
    candidates = None
    if batches or shards:
        bs = batches or (1, 2, 4, 8)
        ss = shards or tuple(sorted({s for s in (1, 8, gpus) if s <= gpus and gpus % s == 0}))
        candidates = [Candidate(b, s, off) for b in bs for s in ss for off in (False, True)]
    rows = plan(table, gpus, candidates, ref_seconds=ref_seconds)
    click.echo(f"{table.name} ({table.row}): preset {table.preset}, global batch {table.batch}, "
               f"{table.steps} steps, {gpus} GPU(s), attention {table.attention}")
    time_head = "step s" if ref_seconds is not None else "step units"
    click.echo(f"{'b/gpu':>5} {'shard':>5} {'offload':>7} {'accum':>5} {'eff.batch':>9} {time_head:>12} "
               f"{'mem GiB':>8} fits80GB")
    for r in rows:
        t = r.step_seconds if r.step_seconds is not None else r.step_units
        click.echo(f"{r.candidate.batch_per_gpu:>5} {r.candidate.shard_gpus:>5} "
                   f"{'yes' if r.candidate.offload else 'no':>7} "
                   f"{r.grad_accum:>5} {r.effective_batch:>9} {t:>12.4g} {r.memory_gib:>8.1f} "
                   f"{'yes' if r.fits else 'NO'}")
    if ref_seconds is not None:
        best = [r for r in rows if r.fits and r.step_seconds is not None]
        if best:
            days = min(r.step_seconds for r in best) * table.steps / 86400
            click.echo(f"fastest fitting setting: {days:.1f} days for {table.steps} steps")
    notes = [f"Eq. 2 read as bytes; fits = memory <= {H100_80GB_BYTES / GIB:.1f} GiB",
             "video samples counted at the stage's maximum length"]
    if table.attention == "nabla":
        notes.append("NABLA stage: Eq. 1 models dense attention, so step time is an upper bound")
    for note in notes:
        click.echo(f"note: {note}")


class _ProgressBar:
    """Trainer callback: a tqdm bar with ETA, the latest loss in its postfix. Drawn from the first step on (a resumed
    run starts where it resumed), so a run that fails while setting up prints its one error line only."""

    def __init__(self, total: int):
        self.total = total
        self.bar: Any = None

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=step - 1, unit="step", desc="train")
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{metrics.get('lr', 0.0):.2e}")


_CLICK_TYPES = {"int": click.INT, "float": click.FLOAT, "str": click.STRING}


def job_options(command: Any, optional_out: bool = False) -> Any:
    """One click option per ``TrainJob`` field (``--field-name``), its help the field's docstring: the dataclasses
    are the only place an option is defined."""
    from k5model.training.job import job_fields

    for section, f, doc in reversed(job_fields()):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" | None", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind == "bool":
            decl = f"{flag}/--no-{flag[2:]}" if default else flag
            command = click.option(decl, f.name, is_flag=True, default=bool(default), show_default=bool(default),
                                   help=f"[{section}] {doc}")(command)
        else:
            required = f.name == "out" and not optional_out
            command = click.option(flag, f.name, type=_CLICK_TYPES[kind], default=None if required else default,
                                   required=required, show_default=default is not None and not required,
                                   help=f"[{section}] {doc}")(command)
    return command


@click.command("train")
@job_options
def train(**values: Any) -> None:
    """Train a stage (a Table 4 stage name, or tiny_demo) with a progress bar: the same TrainJob and trainer that
    the Dagster stage assets launch. With --nproc N > 1, torchrun runs N processes."""
    import subprocess
    import sys

    from k5cli.main import K5Error
    from k5model.training.job import TrainJob

    try:
        job = TrainJob.from_flat(**values)
    except ValueError as err:
        raise K5Error(str(err)) from None
    for flag, folder in (("--init", job.init.init), ("--text-encoders", job.data.text_encoders)):
        if folder and not Path(folder).exists():  # before torchrun or any model is built
            raise K5Error(f"{flag} {folder}: no such file or folder; pass an existing model folder (e.g. a stage's "
                          "ema/transformer or a pipeline folder)")
    out = Path(job.checkpoint.out)
    if job.parallel.nproc > 1:
        # several processes: torchrun prints rank 0's JSON lines; the bar belongs to the single-process path
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.json").write_text(job.to_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(job.parallel.nproc), "-m",
               "k5cli.train_run", "--job", str(out / "job.json")]
        raise SystemExit(subprocess.call(cmd))
    import contextlib
    import io

    from k5cli.train_run import resolve_stage, run_training

    target = job.stage.steps if job.stage.steps is not None else resolve_stage(job).steps
    bar = _ProgressBar(total=target)
    # the bar replaces the per-step JSON lines on the terminal (metrics.jsonl in OUT keeps them)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = run_training(job, callbacks=[bar])
    finally:
        if bar.bar is not None:
            bar.bar.close()  # ends the bar's line, so an error below starts on its own line
    click.echo(f"{result['stage']}: trained to step {result['step']} -> {out}")
