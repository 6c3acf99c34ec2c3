"""SBS report rendering: stacked preference bars per criterion (like the report's Fig. 28/29) and an HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from evaluation.sbs.sbs_scores import (
    ALL_CRITERIA,
    BC,
    BI,
    CHOICE_LABELS,
    CRITERION_LABELS,
    EQ,
    GROUPS,
    M1,
    M1U,
    M2,
    M2U,
)

# Segment order left -> right: model A wins, ties/neutral, model B wins (Fig. 28: green / shades / blue).
SEGMENTS: tuple[tuple[str, str], ...] = (
    (M1, "#1a9850"), (M1U, "#91cf60"), (BC, "#d9d9d9"), (EQ, "#bdbdbd"), (BI, "#969696"), (M2U, "#92c5de"),
    (M2, "#2166ac"),
)


def stacked_bars_png(distribution: dict[str, dict[str, float]], name_a: str, name_b: str, path: str | Path,
                     title: str = "") -> Path:
    """Horizontal 100% stacked bars, one per criterion present in ``distribution`` (criterion -> choice -> share),
    in the report's criterion order. Model 1 = A."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt

    crits = [c for c in ALL_CRITERIA if c in distribution]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(crits) + 1.6), dpi=110)
    if not crits:  # nothing judged yet: an honest empty chart rather than no report at all
        ax.text(0.5, 0.5, "no judgments yet", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
    for row, c in enumerate(crits):
        left = 0.0
        for choice, color in SEGMENTS:
            share = distribution[c].get(choice, 0.0)
            if share <= 0:
                continue
            ax.barh(row, share, left=left, color=color, edgecolor="white", linewidth=0.5)
            if share >= 0.06:
                ax.text(left + share / 2, row, f"{share:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if choice in (M1, M2) else "black")
            left += share
    ax.set_yticks(range(len(crits)), [CRITERION_LABELS[c] for c in crits], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    handles = [plt.Rectangle((0, 0), 1, 1, color=col) for _, col in SEGMENTS]
    labels = [CHOICE_LABELS[ch].replace("Model 1", name_a).replace("Model 2", name_b) for ch, _ in SEGMENTS]
    ax.legend(handles, labels, ncol=4, fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.06 - 0.3 / max(1, len(crits))), frameon=False)
    ax.set_title(title or f"{name_a} vs {name_b}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def html_report(summary: dict, name_a: str, name_b: str, png: str | Path, path: str | Path, title: str = "",
                note: str = "") -> Path:
    """Self-contained HTML page (the PNG is embedded) with scores, 95% intervals, agreement and golden accuracy.
    ``summary`` is ``sbs_scores.full_summary`` output; ``note`` (e.g. "simulated judgments") is shown as a banner."""
    img = base64.b64encode(Path(png).read_bytes()).decode()
    a, b = html.escape(name_a), html.escape(name_b)
    ci = summary.get("ci95", {})

    def row(key: str, label: str, scores: dict | None) -> str:
        if not scores:
            return f"<tr><td>{html.escape(label)}</td><td colspan=4>no ratings</td></tr>"
        iv = ci.get(key, {})
        cells = []
        for m in ("model1", "model2"):
            lo_hi = iv.get(m)
            cells.append(f"<td>{scores[m]:.3f}</td><td>{'' if not lo_hi else f'[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]'}</td>")
        return f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>"

    overall = "".join(row(g, g.replace("_", " ").capitalize(), summary.get(g)) for g in GROUPS)
    per_crit = "".join(row(c, CRITERION_LABELS[c], summary["criteria"].get(c)) for c in ALL_CRITERIA
                       if c in summary["criteria"])
    golden = "".join(f"<tr><td>{html.escape(ann)}</td><td>{g['correct']}/{g['checked']}</td>"
                     f"<td>{g['accuracy']:.0%}</td></tr>" for ann, g in summary.get("golden_accuracy", {}).items())
    banner = (f"<p id='k5-note' style='background:#fde0dd;padding:8px;font-weight:bold'>{html.escape(note)}</p>"
              if note else "")
    head = f"<tr><th></th><th>{a}</th><th>95% CI</th><th>{b}</th><th>95% CI</th></tr>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title or f'{name_a} vs {name_b}')}
</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:3px 10px;text-align:right}}
td:first-child{{text-align:left}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}</style>
</head><body><h1>Side-by-side: {a} (model 1) vs {b} (model 2)</h1>{banner}
<p>{summary.get('n_items', 0)} prompts, {summary.get('n_judgments', 0)} judgments (golden pairs excluded).
Scores follow the report §8.2 formulas per prompt, averaged over prompts; intervals: percentile bootstrap over
prompts. Pairwise agreement {_fmt(summary.get('pairwise_agreement'))}, Krippendorff's alpha (nominal)
{_fmt(summary.get('krippendorff_alpha'))}.</p>
<h2>Overall</h2><table>{head}{overall}</table>
<h2>Preferences per criterion</h2><img alt="stacked preference bars" style="max-width:100%"
src="data:image/png;base64,{img}">
<h2>Scores per criterion</h2><table>{head}{per_crit}</table>
<h2>Golden-pair accuracy per annotator</h2><table><tr><th>annotator</th><th>correct</th><th>accuracy</th></tr>
{golden or '<tr><td colspan=3>no golden judgments</td></tr>'}</table></body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path

