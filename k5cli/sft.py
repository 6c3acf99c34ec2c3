"""``k5 sft ...``: the SFT annotation batch, simulated annotators and the v1/v2/mix datasets (report §4.6), on a
store file (default ``K5_HOME/sft/judgments.duckdb``, the one the ``sft_judgments`` asset and the app use)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

_DB_HELP = "SFT judgments store (created if missing), e.g. K5_HOME/sft/judgments.duckdb."


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


@click.group("sft")
def sft() -> None:
    """SFT dataset annotation: Stage 1 screening, Stage 2 expert questionnaires, consensus v1/v2 (report §4.6)."""


@sft.command("batch")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help=_DB_HELP)
@click.option("--curated", required=True, help="Curated dataset folder or s3:// prefix (holds dataset/).")
@click.option("--media", "media_dir", default=None, type=click.Path(file_okay=False),
              help="Where the items' media are copied (default: media/ beside the store).")
@click.option("--regular", default="screener_01,screener_02", show_default=True, help="Stage 1 accounts, comma-sep.")
@click.option("--experts", default="expert_01,expert_02,expert_03,expert_04", show_default=True,
              help="Stage 2 accounts, comma-separated.")
@click.option("--simulated", is_flag=True, help="Use simulated:* accounts (fill them with `k5 sft simulate`).")
@click.option("--stage1-overlap", default=1, show_default=True, help="Screeners per item.")
@click.option("--expert-overlap", default=3, show_default=True, help="Experts per item that passed Stage 1.")
@click.option("--max-items", default=200, show_default=True, help="Items taken, best aesthetic score first.")
def batch(db: str, curated: str, media_dir: str | None, regular: str, experts: str, simulated: bool,
          stage1_overlap: int, expert_overlap: int, max_items: int) -> None:
    """Create (or extend) an annotation batch from a curated dataset's passed rows."""
    from evaluation.sft.batch import SftBatchConfig, create_batch
    from evaluation.sft.simulate import SIMULATED_PREFIX
    from evaluation.sft.store import SftStore
    from k5data.curation.config import load_config
    from k5data.curation.output import read_dataset

    regulars, expert_names = _names(regular), _names(experts)
    if simulated:
        regulars = [f"{SIMULATED_PREFIX}{n}" for n in regulars]
        expert_names = [f"{SIMULATED_PREFIX}{n}" for n in expert_names]
    try:
        cfg = SftBatchConfig(regular_annotators=regulars, experts=expert_names, stage1_overlap=stage1_overlap,
                             expert_overlap=expert_overlap, max_items=max_items)
        store = SftStore(db)
        media = Path(media_dir) if media_dir else Path(db).resolve().parent / "media"
        summary = create_batch(store, read_dataset(curated, load_config()), media, cfg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary))


@sft.command("simulate")
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help=_DB_HELP)
@click.option("--seed", default=0, show_default=True)
def simulate(db: str, seed: int) -> None:
    """Fill the queues of the simulated:* accounts (Stage 1, then Stage 2 of what passed); labelled simulated."""
    from evaluation.sft.simulate import SimulatedRaters, simulate_annotation
    from evaluation.sft.store import SftStore

    click.echo(json.dumps(simulate_annotation(SftStore(db), SimulatedRaters(seed=seed))))


@sft.command("annotator")
@click.argument("name")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help=_DB_HELP)
@click.option("--role", type=click.Choice(["regular", "expert"]), required=True)
@click.option("--password-stdin", is_flag=True, help="Also set the login password, read from stdin.")
def annotator(name: str, db: str, role: str, password_stdin: bool) -> None:
    """Give NAME an SFT role (and a password); run `k5 sft batch` again to extend the screening queue."""
    from evaluation.sft.store import SftStore

    store = SftStore(db)
    store.set_role(name, role)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise click.ClickException("empty password on stdin")
        store.set_password(name, password)
    click.echo(f"{name}: {role}")


@sft.command("status")
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help=_DB_HELP)
def status(db: str) -> None:
    """Progress per annotator and stage, and Stage 1 outcomes."""
    from evaluation.sft.questionnaire import EXPERT, REGULAR, STAGE_EXPERT, STAGE_SCREENING
    from evaluation.sft.store import SftStore

    store = SftStore(db)
    out = {"annotators": {}}
    for role, stage in ((REGULAR, STAGE_SCREENING), (EXPERT, STAGE_EXPERT)):
        for name in store.annotators_with_role(role):
            done, total = store.sft_progress(name, stage)
            out["annotators"][name] = {"role": role, "stage": stage, "done": done, "total": total}
    outcomes = store.stage1_outcomes()
    out.update({"items": len(store.items_frame()), "screened": len(outcomes), "passed": sum(outcomes.values())})
    click.echo(json.dumps(out, indent=2))


@sft.command("build")
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help=_DB_HELP)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for v1/v2/mix.")
@click.option("--v1-min-good", default=2 / 3, show_default=True, help="v1: share of 'good' per criterion.")
@click.option("--v1-min-experts", default=3, show_default=True)
@click.option("--v2-min-good", default=0.5, show_default=True)
@click.option("--v2-min-experts", default=2, show_default=True)
@click.option("--v2-max-failed", default=2, show_default=True, help="v2: criteria allowed below --v2-min-good.")
@click.option("--p-v1", default=None, type=float, help="Mix: share of samples from v1 (default: calibrated).")
@click.option("--v1-upweight", default=3.0, show_default=True, help="Mix: v1 row weight relative to a v2-only row.")
def build(db: str, out_dir: str, v1_min_good: float, v1_min_experts: int, v2_min_good: float, v2_min_experts: int,
          v2_max_failed: int, p_v1: float | None, v1_upweight: float) -> None:
    """Consensus -> v1.parquet, v2.parquet, mix.parquet (+ mix.json); prints counts and agreement per criterion."""
    from evaluation.sft.consensus import ConsensusConfig
    from evaluation.sft.datasets import MixConfig, build_versions, consensus_table, write_mix
    from evaluation.sft.store import SftStore

    try:
        cfg = ConsensusConfig(v1_min_good=v1_min_good, v1_min_experts=v1_min_experts, v2_min_good=v2_min_good,
                              v2_min_experts=v2_min_experts, v2_max_failed_criteria=v2_max_failed)
        mix_cfg = MixConfig(p_v1=p_v1, v1_upweight=v1_upweight)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    store = SftStore(db)
    versions = build_versions(store, cfg, Path(out_dir))
    mix_path, info = write_mix(consensus_table(store, cfg), mix_cfg, Path(out_dir))
    click.echo(json.dumps({**versions, "mix": {"path": str(mix_path), **info}}, indent=2))


if __name__ == "__main__":
    sft()
