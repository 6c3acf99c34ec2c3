"""MLflow logging of an SBS report: the report's own run (params, metrics, artifacts, a ``k5_simulated`` tag) and
each compared model's side of the scores on that model's run (the stage's training run when known)."""

from __future__ import annotations

from typing import Any

from evaluation.sbs.aggregate import ReportResult
from evaluation.sbs.sbs_scores import GROUPS


def flat_metrics(summary: dict, prefix: str = "sbs.") -> dict[str, float]:
    """``<prefix><criterion or group>.model1|model2`` plus agreement statistics, as MLflow metrics."""
    out: dict[str, float] = {}
    for name, scores in list(summary["criteria"].items()) + [(g, summary.get(g)) for g in GROUPS]:
        if scores:
            out[f"{prefix}{name}.model1"] = scores["model1"]
            out[f"{prefix}{name}.model2"] = scores["model2"]
    for group in GROUPS:
        for side, interval in summary.get("ci95", {}).get(group, {}).items():
            out[f"{prefix}{group}.{side}.ci95_low"], out[f"{prefix}{group}.{side}.ci95_high"] = interval
    for key in ("pairwise_agreement", "krippendorff_alpha"):
        if summary.get(key) is not None:
            out[f"{prefix}{key}"] = float(summary[key])
    return out


def report_tags(result: ReportResult) -> dict[str, str]:
    """Tags of the report run; ``k5_simulated`` makes demo scores impossible to mistake for human ones."""
    s = result.summary
    return {"k5_comparison": s["comparison"], "k5_model_a": s["model_a"], "k5_model_b": s["model_b"],
            "k5_simulated": str(result.simulated).lower(), "k5_judgments_source": result.source}


def model_run_id(client: Any, experiment_id: str, model: str) -> str:
    """The MLflow run that stands for a compared model without a known training run (tag ``k5_model``); created,
    and ended, on first use."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.k5_model = '{model}'", max_results=1,
                              order_by=["attributes.start_time ASC"])
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"model/{model}", tags={"k5_model": model})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def log_sbs_report(client: Any, run_id: str, experiment_id: str, result: ReportResult,
                   model_runs: dict[str, str | None] | None = None) -> dict[str, str]:
    """Log ``result`` on the report run ``run_id`` and each model's side on that model's run: ``model_runs`` maps a
    model name to its run id (e.g. the stage's training run); a missing or None entry uses ``model_run_id``.
    Returns {model name: run id used}."""
    s = result.summary
    comparison, name_a, name_b = s["comparison"], s["model_a_name"], s["model_b_name"]
    params = {"comparison": comparison, "model_a": s["model_a"], "model_b": s["model_b"], "source": result.source,
              "simulated": result.simulated, "n_judgments": s["n_judgments"]}
    for k, v in params.items():
        client.log_param(run_id, k, v)
    for k, v in report_tags(result).items():
        client.set_tag(run_id, k, v)
    metrics = flat_metrics(s)
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    for f in (result.png_path, result.html_path, result.summary_path):
        client.log_artifact(run_id, str(f), artifact_path="sbs")
    used: dict[str, str] = {}
    model_runs = model_runs or {}
    # Each model's run gets its own side of the scores ("model1" for A, "model2" for B) under the comparison.
    for model, side in ((name_a, "model1"), (name_b, "model2")):
        target = model_runs.get(model) or model_run_id(client, experiment_id, model)
        used[model] = target
        for k, v in metrics.items():
            if k.endswith(f".{side}"):
                client.log_metric(target, f"sbs.{comparison}.{k[4:-len(side) - 1]}", v)
        client.set_tag(target, f"k5_sbs.{comparison}", "simulated" if result.simulated else result.source)
        client.log_artifact(target, str(result.html_path), artifact_path=f"sbs/{comparison}")
    return used
