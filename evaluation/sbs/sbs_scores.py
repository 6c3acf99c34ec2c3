"""Side-by-side (SBS) scoring exactly as report §8.2, plus the statistics the report leaves out.

Vocabulary. A judgment is ``(item_id, annotator, criterion, choice)`` with choices expressed for
*model 1 = A* (the side mapping of the annotation screen has already been undone, see ``unswap_choice``).

Formulas (per item, over the fractions of that item's judgments for one criterion, then the mean over items):

* prompt following:      S1 = M1better + BothCorrect + Equally/2
* visual criteria 1-9:   S1 = M1better + M1unconfident/2 + Equally/2
* visual criteria 10-11: S1 = M1better + BothCorrect + Equally/2

(S2 symmetric). Each is linear in the fractions, so it equals the mean over that item's judgments of a per-choice
weight; that is how it is computed below. Group scores are the unweighted mean of the group's per-criterion scores
("averaged by percentage"), criteria with no ratings left out.

``visual_8`` (faces) additionally accepts ``not_applicable``: such a row is valid but carries no vote.

Which rows count (``check_judgments``, the same rule for a table and for the annotation store): a row with an empty
item_id/annotator, an unknown criterion or a choice outside the criterion's set is left out and listed by line; the
key (item_id, annotator, criterion) occurs at most once, since the fractions above are over *annotators*: four copies
of one annotator's row would count that annotator four times. Repeated keys are refused, or with ``dedupe`` exact
copies are kept once and conflicting groups (same key, different choices) dropped whole; a table with no valid row
left is an error.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

# --- vocabulary -----------------------------------------------------------------------------------------------------

VISUAL_CRITERIA: tuple[str, ...] = tuple(f"visual_{i}" for i in range(1, 12))
PF_CRITERIA: tuple[str, ...] = (
    "pf_object_presence",
    "pf_object_quantity",
    "pf_object_properties",
    "pf_object_placement",
    "pf_action_presence",
    "pf_action_properties",
)
ALL_CRITERIA: tuple[str, ...] = VISUAL_CRITERIA + PF_CRITERIA

M1 = "model1_better"
M2 = "model2_better"
EQ = "equally"
M1U = "model1_better_unconfident"
M2U = "model2_better_unconfident"
BC = "both_correct"
BI = "both_incorrect"
NA = "not_applicable"
ALL_CHOICES: tuple[str, ...] = (M1, M2, EQ, M1U, M2U, BC, BI)

# Option sets in the report's order (this order is also the UI's button order).
CHOICES_VISUAL_1_9: tuple[str, ...] = (M1, M2, EQ, M1U, M2U)
CHOICES_VISUAL_10_11: tuple[str, ...] = (M1, M2, BC, EQ)
CHOICES_PF: tuple[str, ...] = (M1, M2, BC, BI, EQ)

CRITERION_LABELS: dict[str, str] = {
    "visual_1": "Composition",
    "visual_2": "Lighting",
    "visual_3": "Color and Contrast",
    "visual_4": "Object and Background Distinctness",
    "visual_5": "Frame Transition Smoothness",
    "visual_6": "Dynamism",
    "visual_7": "Realism of Object Motion",
    "visual_8": "Face Generation Consistency",
    "visual_9": "Overall Impression",
    "visual_10": "Number of Artifacts",
    "visual_11": "Number of Semantic Breaks",
    "pf_object_presence": "Object Presence (Count)",
    "pf_object_quantity": "Object Quantity",
    "pf_object_properties": "Object Properties",
    "pf_object_placement": "Object Placement",
    "pf_action_presence": "Action Presence (Count)",
    "pf_action_properties": "Action Properties",
}
CHOICE_LABELS: dict[str, str] = {
    M1: "Model 1 better",
    M2: "Model 2 better",
    EQ: "Equally",
    M1U: "Model 1 better (unconfident)",
    M2U: "Model 2 better (unconfident)",
    BC: "Both fully correct",
    BI: "Both fully incorrect",
    NA: "Not applicable (no faces)",
}

GROUPS: dict[str, tuple[str, ...]] = {
    "overall_visual_quality": tuple(f"visual_{i}" for i in (1, 2, 3, 4, 5, 9, 10)),
    "overall_motion": tuple(f"visual_{i}" for i in (6, 7, 8, 11)),
    "overall_prompt_following": PF_CRITERIA,
}


def allowed_choices(criterion: str) -> tuple[str, ...]:
    """The report's option set for ``criterion`` (KeyError for an unknown criterion)."""
    if criterion in PF_CRITERIA:
        return CHOICES_PF
    if criterion in VISUAL_CRITERIA:
        return CHOICES_VISUAL_10_11 if criterion in ("visual_10", "visual_11") else CHOICES_VISUAL_1_9
    raise KeyError(criterion)


def is_valid(criterion: object, choice: object) -> bool:
    """True when ``choice`` is allowed for ``criterion`` (``not_applicable`` only for visual_8)."""
    if not isinstance(criterion, str) or criterion not in ALL_CRITERIA or not isinstance(choice, str):
        return False
    return choice in allowed_choices(criterion) or (criterion == "visual_8" and choice == NA)


# Per-choice weights (w1, w2): the formulas above, since each is linear in the choice fractions.
_W_VISUAL_1_9 = {M1: (1.0, 0.0), M2: (0.0, 1.0), EQ: (0.5, 0.5), M1U: (0.5, 0.0), M2U: (0.0, 0.5)}
_W_BOTH = {M1: (1.0, 0.0), M2: (0.0, 1.0), EQ: (0.5, 0.5), BC: (1.0, 1.0), BI: (0.0, 0.0)}


def choice_weights(criterion: str, choice: str) -> tuple[float, float]:
    """(model 1, model 2) contribution of one judgment to its item's score."""
    if not is_valid(criterion, choice) or choice == NA:
        raise ValueError(f"choice {choice!r} carries no vote for {criterion!r}")
    table = _W_VISUAL_1_9 if allowed_choices(criterion) is CHOICES_VISUAL_1_9 else _W_BOTH
    return table[choice]


_SWAP = {M1: M2, M2: M1, M1U: M2U, M2U: M1U}


def unswap_choice(choice: str, a_on_left: bool) -> str:
    """Map a choice made on screen (model 1 = left) to A/B terms (model 1 = A)."""
    return choice if a_on_left else _SWAP.get(choice, choice)


# --- reading and validation -----------------------------------------------------------------------------------------

REQUIRED_COLUMNS = ("item_id", "annotator", "criterion", "choice")
JUDGMENT_KEY = ("item_id", "annotator", "criterion")
"""One annotator judges one criterion of one item once: the key a table must not repeat."""
MAX_LISTED = 20
"""Invalid rows listed by line and reason (the rest only counted)."""
_EXAMPLES = 3  # repeated keys quoted, with their lines, in an error or a de-duplication report


class JudgmentsError(ValueError):
    """A judgments table that cannot be scored as it is; the message names the file, the lines and what to do."""


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _decode_csv(raw: bytes, path: str) -> str:
    """UTF-8 text (a BOM is allowed) or a JudgmentsError naming the first bad line and the likely cause."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise JudgmentsError(f"{path}: line {_line_of(raw, nul)} contains NUL bytes: the file looks UTF-16 encoded "
                             "(Excel 'Unicode text') or binary; export it as 'CSV UTF-8'")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = _line_of(raw, exc.start)
        start = raw.rfind(b"\n", 0, exc.start) + 1
        end = raw.find(b"\n", exc.start)
        text = raw[start:end if end >= 0 else len(raw)].decode("cp1252", errors="replace").strip()
        raise JudgmentsError(
            f"{path}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); the file was "
            f"probably saved in a legacy 8-bit encoding such as Windows-1252/Latin-1 (it would read {text[:60]!r}); "
            "re-save it as UTF-8") from None


def read_judgments(path: str) -> pd.DataFrame:
    """Read a CSV (UTF-8) or Parquet judgments table as strings (the suffix decides; ``.pq``/``.parquet`` are
    Parquet). Raises JudgmentsError for an unreadable file (naming the line and likely cause for a bad encoding),
    missing columns or a table with a header only."""
    if str(path).lower().endswith((".parquet", ".pq")):
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise JudgmentsError(f"{path}: not a readable Parquet file ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); write it again or pass a "
                                 "CSV") from None
    else:
        with open(path, "rb") as fh:
            text = _decode_csv(fh.read(), str(path))
        try:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise JudgmentsError(f"{path}: empty file; need a header line {','.join(REQUIRED_COLUMNS)} and one row "
                                 "per judgment") from None
        except pd.errors.ParserError as exc:
            raise JudgmentsError(f"{path}: not a CSV table ({' '.join(str(exc).split())}); quote fields that "
                                 "contain commas") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise JudgmentsError(f"{path}: missing columns {missing}; need {list(REQUIRED_COLUMNS)}")
    if df.empty:
        raise JudgmentsError(f"{path}: a header and no judgment rows; nothing to score")
    return df


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def invalid_reason(item_id: object, annotator: object, criterion: object, choice: object) -> str | None:
    """Why one row cannot be scored (None: it can): an empty item_id/annotator, an unknown criterion, or a choice
    not allowed for that criterion."""
    if _blank(item_id):
        return "empty item_id"
    if _blank(annotator):
        return "empty annotator"
    if not isinstance(criterion, str) or criterion not in ALL_CRITERIA:
        return f"unknown criterion {criterion!r}"
    if not is_valid(criterion, choice):
        return f"choice {choice!r} not allowed for {criterion}"
    return None


def _reasons(df: pd.DataFrame) -> list[str | None]:
    return [invalid_reason(*row) for row in zip(df["item_id"], df["annotator"], df["criterion"], df["choice"])]


def split_valid(df: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    """Split into (valid rows, invalid line numbers). Line numbers count the header as line 1, so the first data
    row is line 2 (the same convention for Parquet: row index + 2). Invalid: see ``invalid_reason``."""
    df = df.reset_index(drop=True)
    mask = np.asarray([r is None for r in _reasons(df)], dtype=bool)
    return df.loc[mask, list(REQUIRED_COLUMNS)].astype(str).reset_index(drop=True), [
        int(i) + 2 for i in np.flatnonzero(~mask)]


@dataclass(frozen=True)
class DuplicateReport:
    """Rows sharing one JUDGMENT_KEY: exact copies (same choice) and conflicts (different choices)."""

    exact_groups: int
    exact_rows_dropped: int
    """Extra copies beyond the first of each exact group (what de-duplication drops)."""
    conflict_groups: int
    conflict_rows: int
    """Every row of a conflicting group (de-duplication drops them all: no copy can be trusted over another)."""
    examples: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.exact_groups or self.conflict_groups)

    def describe(self) -> str:
        parts = []
        if self.exact_groups:
            parts.append(f"{self.exact_groups} (item_id, annotator, criterion) group(s) repeated with the same "
                         f"choice ({self.exact_rows_dropped} extra row(s))")
        if self.conflict_groups:
            parts.append(f"{self.conflict_groups} group(s) with conflicting choices ({self.conflict_rows} row(s))")
        return "; ".join(parts) + (f"; e.g. {'; '.join(self.examples)}" if self.examples else "")

    def to_dict(self) -> dict:
        return {"exact_groups": self.exact_groups, "exact_rows_dropped": self.exact_rows_dropped,
                "conflict_groups": self.conflict_groups, "conflict_rows_dropped": self.conflict_rows,
                "examples": list(self.examples)}


@dataclass(frozen=True)
class CheckedJudgments:
    """A table after ``check_judgments``: the rows to score and what was left out, and why."""

    valid: pd.DataFrame
    invalid_lines: list[int]
    invalid_listing: list[str]
    """'line N: reason' for the first MAX_LISTED invalid rows (``invalid_lines`` has them all)."""
    duplicates: DuplicateReport
    deduplicated: bool

    def invalid_summary(self) -> str:
        more = len(self.invalid_lines) - len(self.invalid_listing)
        return "; ".join(self.invalid_listing) + (f"; ... and {more} more" if more > 0 else "")


def _example(group: pd.DataFrame) -> str:
    item, annotator, criterion = (group.iloc[0][k] for k in JUDGMENT_KEY)
    lines = ", ".join(f"{ln} ({ch})" for ln, ch in zip(group["line"], group["choice"]))
    return f"item {item!r}, annotator {annotator!r}, {criterion}: lines {lines}"


def _duplicates(rows: pd.DataFrame) -> tuple[pd.Series, DuplicateReport]:
    """(rows to keep when de-duplicating, report) for valid rows carrying a ``line`` column."""
    by_key = rows.groupby(list(JUDGMENT_KEY), sort=False)["choice"]
    repeated = by_key.transform("size").to_numpy() > 1
    conflict = repeated & (by_key.transform("nunique").to_numpy() > 1)
    exact = repeated & ~conflict
    first = ~rows.duplicated(list(JUDGMENT_KEY), keep="first").to_numpy()
    keep = pd.Series(~repeated | (exact & first), index=rows.index)
    examples = [_example(g) for _, g in rows.loc[conflict].groupby(list(JUDGMENT_KEY), sort=False)][:_EXAMPLES]
    examples += [_example(g) for _, g in rows.loc[exact].groupby(list(JUDGMENT_KEY), sort=False)][:_EXAMPLES]
    n_exact_groups = int((exact & first).sum())
    report = DuplicateReport(
        exact_groups=n_exact_groups, exact_rows_dropped=int(exact.sum()) - n_exact_groups,
        conflict_groups=int((conflict & first).sum()), conflict_rows=int(conflict.sum()),
        examples=tuple(examples[:_EXAMPLES]))
    return keep, report


def check_judgments(df: pd.DataFrame, *, dedupe: bool = False, require_rows: bool = True,
                    source: str = "judgments") -> CheckedJudgments:
    """The one rule for every judgments source (a table file or the annotation store):

    * invalid rows (``invalid_reason``) are left out and listed by line (header = line 1);
    * a (item_id, annotator, criterion) key may occur once: repeated keys raise JudgmentsError naming counts and
      examples, unless ``dedupe``, which keeps one copy of exact duplicates and drops conflicting groups entirely
      (reported in ``duplicates``): copies would otherwise weigh one annotator several times in an item's fractions;
    * with ``require_rows``, no valid row left is a JudgmentsError (a table that scores nothing is a mistake; an
      annotation store not judged yet passes ``require_rows=False``)."""
    df = df.reset_index(drop=True)
    reasons = _reasons(df)
    bad = [i for i, r in enumerate(reasons) if r is not None]
    listing = [f"line {i + 2}: {reasons[i]}" for i in bad[:MAX_LISTED]]
    mask = np.asarray([r is None for r in reasons], dtype=bool)
    rows = df.loc[mask, list(REQUIRED_COLUMNS)].astype(str)
    rows["line"] = rows.index + 2
    keep, report = _duplicates(rows)
    if report and not dedupe:
        raise JudgmentsError(f"{source}: {report.describe()}. Each annotator judges a criterion of an item once; "
                             "fix the table, or de-duplicate (k5 sbs score --dedupe) to keep one copy of exact "
                             "duplicates and drop conflicting groups")
    rows = rows.loc[keep] if dedupe else rows
    checked = CheckedJudgments(valid=rows[list(REQUIRED_COLUMNS)].reset_index(drop=True),
                               invalid_lines=[i + 2 for i in bad], invalid_listing=listing, duplicates=report,
                               deduplicated=dedupe)
    if require_rows and checked.valid.empty:
        what = "no rows" if df.empty else (f"all {len(df)} row(s) invalid ({checked.invalid_summary()})" if bad
                                           else "every row dropped as a conflicting duplicate")
        raise JudgmentsError(f"{source}: no valid judgment to score: {what}")
    return checked


# --- scores ---------------------------------------------------------------------------------------------------------


def item_scores(valid: pd.DataFrame) -> pd.DataFrame:
    """Per (criterion, item_id): the report's formula over that item's judgment fractions -> columns s1, s2, n."""
    voting = valid[valid["choice"] != NA]
    if voting.empty:
        return pd.DataFrame(columns=["criterion", "item_id", "s1", "s2", "n"])
    w = [choice_weights(c, ch) for c, ch in zip(voting["criterion"], voting["choice"])]
    frame = voting[["criterion", "item_id"]].copy()
    frame["s1"] = [a for a, _ in w]
    frame["s2"] = [b for _, b in w]
    out = frame.groupby(["criterion", "item_id"], sort=True).agg(s1=("s1", "mean"), s2=("s2", "mean"), n=("s1", "size"))
    return out.reset_index()


def _group_means(criteria: dict[str, dict[str, float]]) -> dict[str, dict[str, float] | None]:
    out: dict[str, dict[str, float] | None] = {}
    for group, members in GROUPS.items():
        present = [criteria[c] for c in members if c in criteria]
        out[group] = (
            {"model1": float(np.mean([p["model1"] for p in present])),
             "model2": float(np.mean([p["model2"] for p in present]))}
            if present
            else None
        )
    return out


def _scores(valid: pd.DataFrame) -> dict:
    """Per-criterion and group scores of already checked rows (None for a group with nothing rated)."""
    per_item = item_scores(valid)
    criteria: dict[str, dict[str, float]] = {}
    for criterion in ALL_CRITERIA:  # report order, not alphabetical
        rows = per_item[per_item["criterion"] == criterion]
        if len(rows):
            criteria[criterion] = {"model1": float(rows["s1"].mean()), "model2": float(rows["s2"].mean())}
    result: dict = {"criteria": criteria}
    result.update(_group_means(criteria))
    return result


def score_judgments(df: pd.DataFrame, *, dedupe: bool = False, source: str = "judgments") -> dict:
    """The ``k5 sbs score`` result: per-criterion and group scores, the first MAX_LISTED invalid line numbers
    (``invalid_rows``; ``n_invalid_rows`` counts them all) and what de-duplication did (``duplicates``).
    Raises JudgmentsError as ``check_judgments`` does."""
    return score_checked(check_judgments(df, dedupe=dedupe, source=source))


def score_checked(checked: CheckedJudgments) -> dict:
    """``score_judgments`` of a table already through ``check_judgments``."""
    result = _scores(checked.valid)
    result["invalid_rows"] = checked.invalid_lines[:MAX_LISTED]
    result["n_invalid_rows"] = len(checked.invalid_lines)
    result["n_judgments"] = int(len(checked.valid))
    result["duplicates"] = checked.duplicates.to_dict() if checked.deduplicated else None
    return result


# --- bootstrap ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def _bootstrap_replicates(valid: pd.DataFrame, n_boot: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Criteria present and replicate scores ``reps[m, b, c]`` (model m+1, replicate b, criterion c): each replicate
    resamples items with replacement and recomputes every criterion score (NaN where no rated item was drawn).
    No ratings: no criteria and an empty array."""
    per_item = item_scores(valid)
    if per_item.empty:
        return [], np.empty((2, n_boot, 0))
    items = sorted(per_item["item_id"].unique())
    index = {it: i for i, it in enumerate(items)}
    crits = [c for c in ALL_CRITERIA if c in set(per_item["criterion"])]
    # (criterion, item) matrices with NaN where an item has no rating for that criterion.
    s = np.full((2, len(crits), len(items)), np.nan)
    for r in per_item.itertuples(index=False):
        ci = crits.index(r.criterion)
        s[0, ci, index[r.item_id]] = r.s1
        s[1, ci, index[r.item_id]] = r.s2
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(items), size=(n_boot, len(items)))
    # counts[b, i] = how often item i was drawn in replicate b; a weighted mean avoids materialising resamples.
    counts = np.zeros((n_boot, len(items)))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    present = ~np.isnan(s[0])  # (C, I)
    filled = np.nan_to_num(s)
    denom = counts @ present.T.astype(float)  # (B, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = np.stack([(counts @ filled[m].T) / denom for m in range(2)])  # (2, B, C); NaN if criterion undrawn
    return crits, reps


def _percentile_interval(values: np.ndarray, level: float) -> Interval:
    values = values[~np.isnan(values)]
    alpha = (1.0 - level) / 2.0
    return Interval(float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)))


def _group_replicates(crits: list[str], reps: np.ndarray) -> dict[str, np.ndarray]:
    """Per group with rated criteria: replicate group scores (2, B), the unweighted mean of its criteria."""
    out: dict[str, np.ndarray] = {}
    for group, members in GROUPS.items():
        cols = [crits.index(c) for c in members if c in crits]
        if cols:
            with warnings.catch_warnings():  # a replicate that drew none of a group's criteria is NaN, dropped later
                warnings.simplefilter("ignore", RuntimeWarning)
                out[group] = np.stack([np.nanmean(reps[m][:, cols], axis=1) for m in range(2)])
    return out


def bootstrap_intervals(
    valid: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, Interval]]:
    """Percentile bootstrap intervals over prompts (items): each replicate resamples items with replacement and
    recomputes every criterion score and group score. Returns {name: {"model1": Interval, "model2": Interval}}."""
    crits, reps = _bootstrap_replicates(valid, n_boot, seed)
    out = {c: {f"model{m + 1}": _percentile_interval(reps[m, :, ci], level) for m in range(2)}
           for ci, c in enumerate(crits)}
    for group, g in _group_replicates(crits, reps).items():
        out[group] = {f"model{m + 1}": _percentile_interval(g[m], level) for m in range(2)}
    return out


def bootstrap_difference_intervals(
    valid: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Interval]:
    """Percentile bootstrap interval of the paired difference D = S1 - S2 per criterion and group.

    Each replicate resamples items (the same draws as ``bootstrap_intervals`` for a seed) and computes
    D_b = S1_b - S2_b on that one resample, so the interval is the one of the comparison itself: both models are
    judged on the same prompts, and the per-model intervals cannot be combined into it (their errors are correlated).
    Returns {name: Interval}; a release gate asks whether ``low`` clears a margin."""
    crits, reps = _bootstrap_replicates(valid, n_boot, seed)
    out = {c: _percentile_interval(reps[0, :, ci] - reps[1, :, ci], level) for ci, c in enumerate(crits)}
    for group, g in _group_replicates(crits, reps).items():
        out[group] = _percentile_interval(g[0] - g[1], level)
    return out


# --- agreement ------------------------------------------------------------------------------------------------------


def _units(valid: pd.DataFrame, criteria: Iterable[str] | None) -> list[list[str]]:
    voting = valid[valid["choice"] != NA]
    if criteria is not None:
        voting = voting[voting["criterion"].isin(list(criteria))]
    return [list(g["choice"]) for _, g in voting.groupby(["item_id", "criterion"], sort=False)]


def pairwise_agreement(valid: pd.DataFrame, criteria: Iterable[str] | None = None) -> float | None:
    """Pairwise percent agreement (Fig. 28's "inter-rater agreement"): over every (item, criterion) and every pair
    of its judgments, the share of pairs that chose the same option. None when no unit has two judgments."""
    agree = total = 0
    for values in _units(valid, criteria):
        for a, b in combinations(values, 2):
            total += 1
            agree += a == b
    return agree / total if total else None


def krippendorff_alpha_nominal(units: Sequence[Sequence[object]]) -> float | None:
    """Krippendorff's alpha for nominal data. ``units``: per unit, the values given by its raters (missing values
    simply absent). Units with fewer than two values are not pairable and drop out. Built from the coincidence
    matrix: alpha = 1 - (n - 1) * sum_{c!=k} o_ck / sum_{c!=k} n_c n_k. None when undefined (no pairable values,
    or a single category overall so expected disagreement is zero)."""
    coincidence: dict[tuple[object, object], float] = {}
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, a in enumerate(values):
            for j, b in enumerate(values):
                if i != j:
                    coincidence[(a, b)] = coincidence.get((a, b), 0.0) + 1.0 / (m - 1)
    if not coincidence:
        return None
    n_c: dict[object, float] = {}
    for (a, _), v in coincidence.items():
        n_c[a] = n_c.get(a, 0.0) + v
    n = sum(n_c.values())
    observed = sum(v for (a, b), v in coincidence.items() if a != b)
    expected = sum(n_c[a] * n_c[b] for a in n_c for b in n_c if a != b)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def krippendorff_alpha(valid: pd.DataFrame, criteria: Iterable[str] | None = None) -> float | None:
    """Nominal Krippendorff's alpha over (item, criterion) units of a judgments table."""
    return krippendorff_alpha_nominal(_units(valid, criteria))


# --- golden pairs ---------------------------------------------------------------------------------------------------

# A clearly degraded side must lose on the criteria a degradation visibly hurts.
GOLDEN_DEGRADED_CRITERIA: tuple[str, ...] = ("visual_9", "visual_10")
_TIE_CHOICES = frozenset({EQ, BC, BI})


def golden_correct(kind: str, better: str | None, criterion: str, choice: str) -> bool | None:
    """Is one judgment on a golden pair right? ``kind`` 'identical' (A and B show the same media: every criterion
    must be a tie) or 'degraded' (``better`` 'A'/'B' is the intact side: it must win, confident or not, on
    GOLDEN_DEGRADED_CRITERIA). None when the criterion is not checked for this kind."""
    if choice == NA:
        return None
    if kind == "identical":
        return choice in _TIE_CHOICES
    if kind == "degraded":
        if criterion not in GOLDEN_DEGRADED_CRITERIA:
            return None
        wins = {M1, M1U} if better == "A" else {M2, M2U}
        return choice in wins
    raise ValueError(f"unknown golden kind {kind!r}")


def golden_accuracy(valid: pd.DataFrame, golden: dict[str, tuple[str, str | None]]) -> dict[str, dict[str, float]]:
    """Per annotator: {"checked": n, "correct": k, "accuracy": k/n} over their judgments on golden items.
    ``golden`` maps item_id -> (kind, better side or None)."""
    stats: dict[str, list[int]] = {}
    for r in valid.itertuples(index=False):
        spec = golden.get(r.item_id)
        if spec is None:
            continue
        verdict = golden_correct(spec[0], spec[1], r.criterion, r.choice)
        if verdict is None:
            continue
        s = stats.setdefault(r.annotator, [0, 0])
        s[0] += 1
        s[1] += int(verdict)
    return {a: {"checked": n, "correct": k, "accuracy": k / n} for a, (n, k) in sorted(stats.items())}


# --- distributions for the stacked bars -----------------------------------------------------------------------------


def choice_distribution(valid: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per criterion, the share of each choice among its voting judgments (the segments of Fig. 28/29's bars)."""
    voting = valid[valid["choice"] != NA]
    out: dict[str, dict[str, float]] = {}
    for criterion in ALL_CRITERIA:
        sub = voting[voting["criterion"] == criterion]
        if len(sub):
            counts = sub["choice"].value_counts()
            out[criterion] = {ch: float(counts.get(ch, 0)) / len(sub) for ch in allowed_choices(criterion)}
    return out


def full_summary(valid: pd.DataFrame, golden: dict[str, tuple[str, str | None]] | None = None,
                 n_boot: int = 1000, seed: int = 0) -> dict:
    """Everything the report asset logs: scores, bootstrap intervals (per model: ``ci95``; of the paired difference
    model1 - model2: ``ci95_diff``), agreement, alpha, golden accuracy.
    Golden items are excluded from the scores (they are rater checks, not comparisons)."""
    golden = golden or {}
    scored = valid[~valid["item_id"].isin(list(golden))].reset_index(drop=True)
    result = _scores(scored)
    cis = bootstrap_intervals(scored, n_boot=n_boot, seed=seed)
    result["ci95"] = {k: {m: [iv.low, iv.high] for m, iv in v.items()} for k, v in cis.items()}
    diffs = bootstrap_difference_intervals(scored, n_boot=n_boot, seed=seed)
    result["ci95_diff"] = {k: [iv.low, iv.high] for k, iv in diffs.items()}  # model1 - model2, paired
    result["pairwise_agreement"] = pairwise_agreement(scored)
    result["krippendorff_alpha"] = krippendorff_alpha(scored)
    result["golden_accuracy"] = golden_accuracy(valid, golden)
    result["distribution"] = choice_distribution(scored)
    result["n_judgments"] = int(len(scored))
    result["n_items"] = int(scored["item_id"].nunique())
    return result
