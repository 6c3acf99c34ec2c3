"""Scoring one SBS batch from its judgments: the store the annotation app writes (or an exported table), optional
simulated judgments for the demo, report §8.2 scores with bootstrap intervals, ``summary.json``, bars and HTML.

Simulated judgments exist only when asked for (the demo): they are written through the store under annotator names
starting with ``simulated:`` (accounts nobody can log in as), and every output that used them says so
(``summary.json``: ``simulated: true``, ``judgments_source: "simulated"``; the HTML report's banner). A report that
was not asked to simulate leaves any simulated rows in the store out of the scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from evaluation.sbs.judgments_store import JudgmentsStore
from evaluation.sbs.sbs_plan import Plan, under_covered
from evaluation.sbs.sbs_report import html_report, stacked_bars_png
from evaluation.sbs.sbs_scores import GROUPS, check_judgments, full_summary, read_judgments, unswap_choice

SIMULATED_PREFIX = "simulated:"


def is_simulated(annotator: str) -> bool:
    return str(annotator).startswith(SIMULATED_PREFIX)


def simulated_mask(rows: pd.DataFrame) -> pd.Series:
    """Boolean mask of the rows written by simulated annotators (bool dtype also for an empty frame)."""
    return rows["annotator"].astype(str).str.startswith(SIMULATED_PREFIX).astype(bool)


@dataclass(frozen=True, kw_only=True)
class ReportSettings:
    """Where the judgments come from and how they are aggregated."""

    judgments_path: str | None = None
    """CSV/Parquet judgments exported from another platform (model 1 = A); default: the batch's judgments store."""
    simulate: bool = False
    """Demo only: write simulated judgments through the store first (labelled as simulated everywhere)."""
    p_a: float = 0.6
    """Simulated raters' preference for model A among decisive votes."""
    n_boot: int = 1000
    """Bootstrap resamples (over prompts) for the 95% intervals."""

    def __post_init__(self) -> None:
        if self.simulate and self.judgments_path:
            raise ValueError("simulate and judgments_path exclude each other: simulated judgments go to the store")
        if not 0.0 <= self.p_a <= 1.0:
            raise ValueError(f"p_a must be in [0, 1], got {self.p_a}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")


@dataclass
class ReportResult:
    """What ``build_report`` wrote and found."""

    summary: dict
    summary_path: Path
    html_path: Path
    png_path: Path
    source: str
    simulated: bool
    coverage: dict[str, int]
    under_covered: dict[str, int] = field(default_factory=dict)

    def overall(self) -> dict[str, dict | None]:
        """Per group: model1/model2 scores, their 95% intervals and the paired interval of model1 - model2 (what the
        release gate reads); None when nothing was rated."""
        out: dict[str, dict | None] = {}
        for group in GROUPS:
            scores = self.summary.get(group)
            ci = self.summary.get("ci95", {}).get(group, {})
            diff = (self.summary.get("ci95_diff") or {}).get(group)
            out[group] = None if not scores else {**scores, "ci95": ci, "ci95_diff": diff}
        return out


def simulate_into_store(store: JudgmentsStore, plan: Plan, p_a: float, seed: int = 0) -> int:
    """Write simulated A/B judgments through the store as the screen would, one simulated annotator per planned one
    (same items, same sides, name ``simulated:<annotator>``). Idempotent: judgments already there are kept.
    Returns the number of rows written."""
    from evaluation.sbs.sbs_demo import simulate_judgments
    from evaluation.sbs.sbs_plan import Assignment

    mirror = Plan(plan.items, [Assignment(SIMULATED_PREFIX + a.annotator, a.item_id, a.a_on_left, a.position)
                               for a in plan.assignments], plan.overlap, plan.seed, plan.meta)
    store.load_plan(mirror)
    sides = {(a.annotator, a.item_id): a.a_on_left for a in mirror.assignments}
    # the swap is its own inverse: A/B -> screen is the same mapping as screen -> A/B
    return store.record_many((r.annotator, r.item_id, r.criterion,
                              unswap_choice(r.choice, sides[(r.annotator, r.item_id)]))
                             for r in simulate_judgments(mirror, p_a=p_a, seed=seed).itertuples(index=False))


def store_judgments(store_path: Path, plan: Plan, settings: ReportSettings) -> tuple[pd.DataFrame, int]:
    """Judgments (A/B terms) from the batch's store after optional simulation; simulated rows only when simulating.
    Returns (rows, simulated rows written now)."""
    with JudgmentsStore(store_path) as store:
        store.load_plan(plan)
        written = simulate_into_store(store, plan, settings.p_a) if settings.simulate else 0
        rows = store.judgments_frame()[["item_id", "annotator", "criterion", "choice"]]
    if not settings.simulate:
        rows = rows.loc[~simulated_mask(rows)].reset_index(drop=True)
    return rows, written


def build_report(root: Path, settings: ReportSettings, log: Callable[[str], None] = print) -> ReportResult:
    """Score the batch under ``root`` (``plan.json``, ``judgments.duckdb``) and write ``report/summary.json``,
    ``report/sbs_bars.png`` and ``report/sbs_report.html``. Raises FileNotFoundError without a batch."""
    plan_path = root / "plan.json"
    if not plan_path.is_file():
        raise FileNotFoundError(f"no SBS batch at {root} (no plan.json): materialize sbs_batch for it first")
    plan = Plan.from_json(plan_path.read_text())
    # one rule for both sources (check_judgments): invalid rows left out and listed, a repeated (item, annotator,
    # criterion) refused with JudgmentsError; only a store may be empty (judging not started: under_covered says so)
    if settings.judgments_path:
        checked = check_judgments(read_judgments(settings.judgments_path), source=settings.judgments_path)
        source = settings.judgments_path
    else:
        rows, written = store_judgments(root / "judgments.duckdb", plan, settings)
        checked = check_judgments(rows, require_rows=False, source=str(root / "judgments.duckdb"))
        source = "simulated" if settings.simulate else "store"
        if settings.simulate:
            log(f"simulated judgments written now: {written}")
    valid, invalid = checked.valid, checked.invalid_lines
    if invalid:
        log(f"{len(invalid)} invalid judgment row(s) left out: {checked.invalid_summary()}")
    simulated = bool(settings.simulate)
    golden = plan.golden_map()
    summary = full_summary(valid, golden=golden, n_boot=settings.n_boot)
    scored = valid.loc[~valid["item_id"].isin(list(golden))]  # the rows behind the scores (n_judgments)
    name_a, name_b = plan.meta.get("model_a", "A"), plan.meta.get("model_b", "B")
    comparison = plan.meta.get("comparison", root.name)
    # model_a/model_b are lineage names ("stage:<stage>", "folder:<path>"), what the release gate matches against
    # the registry; the *_name keys are the short names shown in plots and MLflow.
    summary.update({"comparison": comparison, "model_a": plan.meta.get("model_a_ref", name_a),
                    "model_b": plan.meta.get("model_b_ref", name_b), "model_a_name": name_a, "model_b_name": name_b,
                    "judgments_source": source, "simulated": simulated, "invalid_rows": invalid,
                    "n_invalid_rows": len(invalid),
                    "annotators": sorted(valid["annotator"].unique().tolist()),
                    "n_simulated_judgments": int(simulated_mask(scored).sum())})
    per_item = valid.groupby("item_id")["annotator"].nunique().to_dict()
    cov = {i.item_id: int(per_item.get(i.item_id, 0)) for i in plan.items}

    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    note = ("SIMULATED JUDGMENTS (demo): these scores come from simulated raters, not from people."
            if simulated else "")
    png = stacked_bars_png(summary["distribution"], name_a, name_b, out / "sbs_bars.png",
                           title=comparison + (" (simulated judgments)" if simulated else ""))
    page = html_report(summary, name_a, name_b, png, out / "sbs_report.html", title=comparison, note=note)
    summary_path = out / "summary.json"
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(summary_path)  # the release gate never reads half a file
    return ReportResult(summary=summary, summary_path=summary_path, html_path=page, png_path=png, source=source,
                        simulated=simulated, coverage=cov, under_covered=under_covered(cov, plan.overlap, golden))


def export_for_scoring(store_path: Path, plan: Plan, out: Path, include_simulated: bool = False) -> int:
    """Write the store's judgments as the table ``k5 sbs score`` reads (item_id, annotator, criterion, choice; model
    1 = A), without the golden pairs of ``plan`` (rater checks, which the report leaves out of the scores too) and,
    unless ``include_simulated``, without simulated annotators. CSV, or Parquet for ``.parquet``/``.pq``. Returns
    the number of rows written. Raises ValueError when the plan's pairs are not in the store."""
    if not Path(store_path).is_file():
        raise FileNotFoundError(f"no judgments store at {store_path}")
    with JudgmentsStore(store_path) as store:
        known = set(store.coverage())
        rows = store.judgments_frame()[["item_id", "annotator", "criterion", "choice"]]
    planned = {i.item_id for i in plan.items}
    if known and not planned & known:
        raise ValueError(f"{store_path} holds none of the plan's pairs: is it the store of this comparison?")
    rows = rows.loc[rows["item_id"].isin(planned - set(plan.golden_map()))]
    if not include_simulated:
        rows = rows.loc[~simulated_mask(rows)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".parquet", ".pq"):
        rows.to_parquet(out, index=False)
    else:
        rows.to_csv(out, index=False)
    return int(len(rows))
