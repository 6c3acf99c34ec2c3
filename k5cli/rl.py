"""``k5 rl``: RL post-training from the command line (report §6.6), from the same typed specs the Dagster assets and
their Pipes jobs run (``k5model.rl.jobs``): every field is an option, help from its docstring; ``--job FILE`` reads a
spec (options given on the command line override it).

    k5 rl reward --pairs .k5/models/rl/reward_pairs/pairs.parquet --base-model .k5/models/tiny_reward --out runs/rm
    k5 rl draft --policy .k5/models/sft/video_lite.soup/pipeline --reward-model runs/rm/selected \\
        --pairs .k5/models/rl/reward_pairs/pairs.parquet --out runs/rl --height 64 --width 64 --num-steps 4 --k 2

``k5 rl pairs`` builds the heuristic reward pairs (``k5data.reward_pairs``, options from ``PairSettings``) from a
Parquet of SFT items (the ``sft_mix`` asset's) and the two pipeline folders:

    k5 rl pairs --items .k5/sft/mix/mix.parquet --pretrain .k5/models/video_lite/pretrain/pipeline \\
        --sft .k5/models/sft/video_lite.soup/pipeline --out runs/pairs --seeds-per-item 2
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import click

from k5data.reward_pairs import PairSettings
from k5model.rl.jobs import DraftTrainJob, RewardTrainJob

CLICK_TYPES = {str: click.STRING, int: click.INT, float: click.FLOAT}


def field_option_type(spec: type, name: str) -> Any:
    """The click type of a spec field's option: ``int``, ``float`` or ``str``, also when optional (``int | None``: an
    unset option leaves the spec's default, None); None for a ``bool`` (a ``--x/--no-x`` flag pair)."""
    hint = typing.get_type_hints(spec)[name]
    args = typing.get_args(hint)
    base = next(a for a in args if a is not type(None)) if len(args) == 2 and type(None) in args else hint
    if base is bool:
        return None
    if base not in CLICK_TYPES:
        raise TypeError(f"{spec.__name__}.{name}: no command-line option for type {hint}")
    return CLICK_TYPES[base]


def spec_options(spec: type) -> Any:
    """One ``--field`` option per field of ``spec`` (default None: unset options leave the spec's default)."""
    from k5model.training.job import field_docs

    docs = field_docs(spec)

    def apply(command: Any) -> Any:
        for f in reversed(dataclasses.fields(spec)):
            flag = "--" + f.name.replace("_", "-")
            default = "required" if f.default is dataclasses.MISSING else f"default: {f.default}"
            text = f"{docs.get(f.name, '')} [{default}]"
            kind = field_option_type(spec, f.name)
            if kind is None:
                command = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=text)(command)
            else:
                command = click.option(flag, f.name, type=kind, default=None, help=text)(command)
        return click.option("--job", "job_file", type=click.Path(exists=True, dir_okay=False), default=None,
                            help="a JSON spec to start from")(command)

    return apply


def build_spec(spec: type, job_file: str | None, options: dict[str, Any]) -> Any:
    """The spec from ``--job`` (if any) with the given options over it; a missing required field is a usage error."""
    raw = json.loads(open(job_file).read()) if job_file else {}
    raw.update({k: v for k, v in options.items() if v is not None})
    missing = [f.name for f in dataclasses.fields(spec) if f.default is dataclasses.MISSING and f.name not in raw]
    if missing:
        raise click.UsageError(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)}")
    try:
        return spec(**raw)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc


class EchoSteps:
    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        click.echo(json.dumps({"step": step, **{k: round(v, 6) for k, v in metrics.items()}}))


@click.group()
def rl() -> None:
    """RL post-training (report §6.6): the heuristic reward pairs, the relative reward model and DRaFT-K."""


@rl.command("pairs")
@spec_options(PairSettings)
@click.option("--items", "items_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Parquet of SFT items (the sft_mix asset's): item_id, caption, media_path, kind; optional "
              "media_id (train/val split key), domain")
@click.option("--pretrain", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="pipeline folder of the pre-trained model (the worse generated side)")
@click.option("--sft", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="pipeline folder of the SFT model (the better generated side)")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="output folder: pairs.parquet, pairs.json, images/")
def pairs_cmd(job_file: str | None, items_path: Path, pretrain: Path, sft: Path, out: Path, **options: Any) -> None:
    """Heuristic reward pairs (pretrain < sft < real, both orders) from SFT items and two pipeline folders."""
    from k5data.reward_pairs import build_reward_pairs, read_sft_items

    settings = build_spec(PairSettings, job_file, options)
    try:
        rows = read_sft_items(items_path)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--items") from exc
    summary = build_reward_pairs(rows, pretrain, sft, out, settings, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(summary, indent=2))


@rl.command("reward")
@spec_options(RewardTrainJob)
def reward_cmd(job_file: str | None, **options: Any) -> None:
    """Train the relative reward model on reward pairs; keeps the checkpoint chosen by the KDE σ criterion."""
    from k5model.rl.train_reward import train_reward_model

    summary = train_reward_model(build_spec(RewardTrainJob, job_file, options), callbacks=[EchoSteps()])
    click.echo(json.dumps(summary, indent=2))


@rl.command("draft")
@spec_options(DraftTrainJob)
@click.option("--export/--no-export", default=True, help="assemble OUT/pipeline (the policy + the base's frozen parts)")
def draft_cmd(job_file: str | None, export: bool, **options: Any) -> None:
    """DRaFT-K from a pipeline folder against a reward model; writes OUT/transformer (and OUT/pipeline)."""
    from pathlib import Path

    from k5model.checkpoint import assemble_pipeline_folder
    from k5model.rl.train_draft import train_draft

    job = build_spec(DraftTrainJob, job_file, options)
    summary = train_draft(job, callbacks=[EchoSteps()])
    if export:
        summary["pipeline_dir"] = str(assemble_pipeline_folder(job.policy, Path(job.out) / "transformer",
                                                               Path(job.out) / "pipeline"))
    click.echo(json.dumps(summary, indent=2))
