"""``k5 plan`` and ``k5 stages``: Table 4 stages and the §7.3 step-time / memory planner (no torch use of its own)."""

from __future__ import annotations

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
        click.echo(f"{r.candidate.batch_per_gpu:>5} {r.candidate.shard_gpus:>5} {'yes' if r.candidate.offload else 'no':>7} "
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
    """Trainer callback: a tqdm bar with ETA, the latest loss in its postfix."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", desc="train")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{metrics.get('lr', 0.0):.2e}")


@click.command("train", context_settings={"ignore_unknown_options": True})
@click.argument("stage")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run folder (checkpoints, metrics, EMA)")
@click.option("--steps", type=int, default=None, help="train until this step (default: the stage's)")
@click.option("--demo", is_flag=True, help="a Table 4 stage scaled to the tiny preset (CPU)")
@click.option("--nproc", type=int, default=1, show_default=True, help="processes (GPUs); >1 launches torchrun")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def train(stage: str, out: str, steps: int | None, demo: bool, nproc: int, extra: tuple[str, ...]) -> None:
    """Train STAGE (a Table 4 stage name, or tiny_demo) with a progress bar; the same code Dagster launches.

    Extra options go to ``python -m k5model.training.run`` (e.g. --resume, --init DIR, --bf16, --ckpt-every N)."""
    import subprocess
    import sys

    argv = ["--stage", stage, "--out", out, *(["--steps", str(steps)] if steps else []), *(["--demo"] if demo else []),
            *extra]
    if nproc > 1:
        # several processes: torchrun prints rank 0's JSON lines; the bar belongs to the single-process path
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m",
               "k5model.training.run", *argv]
        raise SystemExit(subprocess.call(cmd))
    import contextlib
    import io

    from k5model.training import run

    target = steps
    if target is None:
        target = run.resolve_stage(stage, demo).steps
    bar = _ProgressBar(total=target)
    # the bar replaces the per-step JSON lines on the terminal (metrics.jsonl in OUT keeps them)
    with contextlib.redirect_stdout(io.StringIO()):
        result = run.main(argv, callbacks=[bar])
    bar.bar.close()
    click.echo(f"{result['stage']}: trained to step {result['step']} -> {out}")
