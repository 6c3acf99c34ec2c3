"""``k5 sbs ...`` commands (a click group the main CLI mounts; also ``python -m k5cli.sbs``)."""

from __future__ import annotations

import json
import sys

import click


@click.group("sbs")
def sbs() -> None:
    """Side-by-side evaluation tools (report §8.2)."""


@sbs.command("score")
@click.argument("judgments", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON to this file.")
@click.option("--dedupe", is_flag=True,
              help="Keep one copy of rows repeated with the same choice and drop every row of a (item_id, annotator, "
                   "criterion) judged with different choices, and report it (default: refuse such a table).")
def score(judgments: str, out: str | None, dedupe: bool) -> None:
    """Score a JUDGMENTS table (CSV in UTF-8, or Parquet; columns item_id, annotator, criterion, choice; model 1 = A).

    Prints {"criteria": {...}, "overall_visual_quality": ..., "overall_motion": ...,
    "overall_prompt_following": ..., "invalid_rows": [...], "n_invalid_rows": N, "n_judgments": N,
    "duplicates": ...}. Invalid rows are excluded and listed by line number (the first 20; ``n_invalid_rows`` counts
    them all, stderr says why each was excluded): the header is line 1, the first data row line 2 (Parquet rows are
    numbered the same way). Each annotator judges a criterion of an item once: a table repeating
    (item_id, annotator, criterion) is refused unless --dedupe; a table with no valid row is an error.
    """
    # imported here so that mounting the group in ``k5`` does not load pandas for every other command
    from evaluation.sbs.sbs_scores import JudgmentsError, check_judgments, read_judgments, score_checked

    try:
        df = read_judgments(judgments)
        checked = check_judgments(df, dedupe=dedupe, source=judgments)
    except JudgmentsError as exc:
        raise click.ClickException(str(exc)) from None
    result = score_checked(checked)
    text = json.dumps(result, indent=2)
    click.echo(text)
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    # stderr, so the JSON on stdout stays machine-readable
    if checked.invalid_lines:
        click.echo(f"warning: {len(checked.invalid_lines)} invalid row(s) excluded: {checked.invalid_summary()}",
                   err=True)
    if dedupe and checked.duplicates:
        d = checked.duplicates
        click.echo(f"dedupe: {d.describe()}; dropped {d.exact_rows_dropped} extra exact cop(ies) and "
                   f"{d.conflict_rows} conflicting row(s), scored {len(checked.valid)} judgment(s)", err=True)
    elif dedupe:
        click.echo("dedupe: no repeated (item_id, annotator, criterion); nothing dropped", err=True)


@sbs.command("export")
@click.option("--db", "db", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Judgments store, e.g. K5_HOME/sbs/<comparison>/judgments.duckdb.")
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The comparison's plan.json (golden pairs are left out of the table).")
@click.option("--include-simulated", is_flag=True, help="Keep the demo's simulated annotators ('simulated:*').")
@click.argument("out", type=click.Path(dir_okay=False))
def export(db: str, plan_path: str, include_simulated: bool, out: str) -> None:
    """Write the judgments of a store to OUT (CSV, or Parquet for .parquet/.pq): the table ``k5 sbs score`` reads,
    model 1 = A. The app may keep running: the export waits its turn on the file."""
    from pathlib import Path

    from evaluation.sbs.aggregate import export_for_scoring
    from evaluation.sbs.judgments_store import StoreBusy
    from evaluation.sbs.sbs_plan import Plan

    try:
        plan = Plan.from_json(Path(plan_path).read_text(encoding="utf-8"))
        n = export_for_scoring(Path(db), plan, Path(out), include_simulated=include_simulated)
    except (ValueError, KeyError, StoreBusy) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{n} judgments written to {out}", err=True)


def main() -> None:
    sbs(prog_name="k5 sbs")


if __name__ == "__main__":
    sys.exit(main())
