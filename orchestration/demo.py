"""``python -m orchestration.demo`` (``make demo``): the whole lineage once, on the persistent local Dagster instance.

Raw media -> curation shards -> curated dataset -> latent shards -> the Table 4 stages (demo scale) -> SBS of the last
Video Lite stage against the first -> a release in the MLflow registry, gated twice: once with a strict margin and once
with none, so both of the gate's outcomes show, each with its reason; then the SFT chain and the distillation chain
(CFG-distilled -> TSCD 16 NFE -> Flash, MagCache calibration; Flash SBS against its teacher; Flash release candidate)
and the RL chain (reward pairs -> reward model -> DRaFT-K from the soup; SBS rl_vs_soup; RL release candidate).
Runs are launched the way the Dagster UI launches them (``orchestration.launch``), so they appear in the job's history
and the Overview timeline. Exit status 0 only if every run and check that should pass did.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from orchestration.settings import K5Paths, offline_env

LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}, "execution": {"config": {"in_process": {}}}}
FAMILY = "video_lite"
STRICT_MARGIN = 0.5  # overall-score advantage a candidate must show before it becomes champion (strict gate)
SIMULATED_PREFERENCE = 0.85  # the demo's simulated raters prefer the later stage (model A) on this share of votes
# The SFT start stage pre-trains longer than the other demo stages (3 steps each): a soup only beats its members'
# mean when they are fine-tuned from a trained start (docs/sft.md measures both cases), and the tiny model needs
# lr 1e-3 to get there in 80 steps. SFT then runs at a tenth of that lr, the report's SFT-to-pre-training ratio
# (1e-5 vs 1e-4), 12 steps per round, at most two rounds per partition.
SFT_START_CONFIG = {"config": {"steps": 80, "lr": 1e-3, "ckpt_every": 20}}  # the family's SFT start stage
SFT_MODELS_CONFIG = {"ops": {"sft_models": {"config": {"steps_per_round": 12, "max_rounds": 2, "lr": 1e-4}}}}
# the demo's simulated annotators pass a handful of items: one item per domain is a partition (validated on itself)
SFT_PARTITIONS_CONFIG = {"ops": {"sft_partitions": {"config": {"min_items": 1, "max_new_tokens": 8}}}}
SFT_COMPARISON = "soup_vs_pretrain"
RL_COMPARISON = "rl_vs_soup"  # RL at demo scale: the rl group's defaults (assets.rl), then this SBS and a release
# Distillation at demo scale (report §6.5, §7.2): 2 optimiser steps a stage, 8-NFE guided reference, 1x16x16 latents
DISTILL_CONFIG = {"ops": {name: {"config": {"train_steps": 2, "reference_steps": 8, "train_seeds": 1,
                                            "latent_frames": 1}}
                          for name in ("cfg_distilled", "tscd_16nfe", "flash", "magcache_calibration")}}
FLASH_COMPARISON = "flash_vs_video_lite_mr_10s"


def _report(name: str, result: Any, gate_may_keep: bool = False) -> bool:
    """Print what failed; ``gate_may_keep``: a failing blocking ``champion_gate`` is a decision, not an error."""
    def gate(text: str) -> bool:
        return gate_may_keep and "champion_gate" in text

    failed = [c for c in result.failed_checks if not gate(c)]
    steps = [s for s in result.step_failures if not gate(s)]
    if not failed and not steps and (result.success or gate_may_keep):
        return True
    print(f"\n{name} FAILED (run {result.run_id}): failed checks {failed}, failed steps {steps}", file=sys.stderr)
    for step in steps:
        print(f"--- {step}\n{result.step_failures[step]}", file=sys.stderr)
    if result.run_failure:
        print(result.run_failure, file=sys.stderr)
    return False


def _gate(release: Any) -> list[str]:
    """The champion_gate decision and reason of a release run."""
    return [f"{c.metadata['decision'].value} - {c.metadata['reason'].value}" for c in release.check_evaluations
            if c.check_name == "champion_gate"]


def _scalars(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(meta.items())
                     if isinstance(v, int | float | str) and "\n" not in str(v) and len(str(v)) < 80)


def _sft_chain(run: Any, sbs_config: dict) -> tuple[Any, Any, Any, Any] | None:
    """SFT at demo scale (report §6.4): partitions of the simulated annotators' mix -> one tiny fine-tune per domain
    -> the soup -> SBS of the soup against its start stage (simulated judgments) -> the soup as a release candidate."""
    parts = run("sft_partitions_job", config=SFT_PARTITIONS_CONFIG)
    if not _report("sft_partitions_job", parts):
        return None
    for key in parts.metadata("sft_partitions")["partitions"]:
        if not _report(f"sft_models_job {key}", run("sft_models_job", key, SFT_MODELS_CONFIG)):
            return None
    soup = run("sft_soup_job")
    if not _report("sft_soup_job", soup):
        return None
    # the soup's SBS uses the demo's whole prompt subset (the batch default), the later chains two prompts
    gated = _sbs_and_release(run, SFT_COMPARISON, sbs_config, {"sft_soup": True, "margin": 0.0}, "SFT soup",
                             subset_size=None)
    return None if gated is None else (parts, soup, *gated)


def _sbs_and_release(run: Any, comparison: str, sbs_config: dict, release_config: dict,
                     label: str, subset_size: int | None = 2) -> tuple[Any, Any] | None:
    """A candidate's SBS at demo scale (``subset_size`` prompts, None: the batch's default; simulated judgments) and
    its release through the gate."""
    batch = {} if subset_size is None else {"sbs_batch": {"config": {"subset_size": subset_size}}}
    sbs = run("sbs_job", comparison, {"ops": {**batch,
                                              "sbs_report": {"config": {**sbs_config, "p_a": SIMULATED_PREFERENCE}}}})
    if not _report(f"sbs_job {comparison}", sbs):
        return None
    release = run("release_job", FAMILY, {"ops": {"release": {"config": release_config}}})
    if not _report(f"release_job {FAMILY} ({label})", release, gate_may_keep=True):
        return None
    return sbs, release


def _distill_chain(run: Any, sbs_config: dict) -> tuple[Any, Any, Any] | None:
    """Distillation at demo scale: cfg_distilled -> tscd_16nfe -> flash and magcache_calibration (each a Pipes job)
    -> SBS of Flash (its own 16 NFE, guidance 1) against its teacher (simulated judgments) -> Flash as a release
    candidate through the gate."""
    distill = run("distill_job", config=DISTILL_CONFIG)
    if not _report("distill_job", distill):
        return None
    gated = _sbs_and_release(run, FLASH_COMPARISON, sbs_config, {"distilled": "flash", "margin": 0.0,
                                                                 "latency_steps": 16}, "Flash")
    return None if gated is None else (distill, *gated)


def _print_gated(comparison: str, label: str, sbs: Any, release: Any) -> None:
    """A candidate chain's last two lines: its SBS result and what the release gate decided."""
    report = sbs.metadata("sbs_report")
    print(f"  SBS {comparison}: {report.get('judgments')} SIMULATED judgments; overall "
          f"{report.get('overall_visual_quality')}")
    print(f"  {label}: version {release.metadata('release').get('version')} (candidate); gate: {_gate(release)}")


def _print_distill(distill: Any, sbs: Any, release: Any) -> None:
    print("\nDistillation (latent MSE to the teacher's guided reference at demo scale):")
    for name in ("cfg_distilled", "tscd_16nfe", "flash", "magcache_calibration"):
        meta = distill.metadata(name)
        print(f"  {name}: {meta.get('nfe')} NFE, guidance {meta.get('guidance_scale')}, MSE "
              f"{meta.get('mse_to_guided_reference'):.6f}; pipeline {meta.get('pipeline_dir')}")
    _print_gated(FLASH_COMPARISON, "Flash release", sbs, release)


def _rl_chain(run: Any, sbs_config: dict) -> tuple[Any, Any, Any] | None:
    """RL at demo scale (report §6.6): reward pairs from the pre-trained stage, the SFT soup and the real SFT images ->
    the tiny reward model (σ-chosen checkpoint) -> DRaFT-K from the soup (each a Pipes job with an MLflow run) -> SBS
    of the RL model against the soup (simulated judgments) -> the RL model as a release candidate."""
    rl = run("rl_job")
    if not _report("rl_job", rl):
        return None
    gated = _sbs_and_release(run, RL_COMPARISON, sbs_config, {"rl_model": True, "margin": 0.0}, "RL model")
    return None if gated is None else (rl, *gated)


def _print_rl(rl: Any, sbs: Any, release: Any) -> None:
    pairs, rm, pol = (rl.metadata(k) for k in ("reward_pairs", "reward_model", "rl_model"))
    print(f"\nRL: {pairs.get('items')} SFT items -> {pairs.get('pairs')} reward pairs ({pairs.get('order')}, both "
          f"orders; {pairs.get('val_items')} items held out)")
    kinds = ", ".join(f"{k.removeprefix('val_accuracy_swap_averaged_').replace('_vs_', '>')} {v:.2f}"
                      for k, v in sorted(rm.items()) if "_vs_" in k)
    print(f"  reward model: val accuracy swap-averaged {rm.get('val_accuracy_swap_averaged'):.3f} (chance 0.5, "
          f"binomial p {rm.get('val_accuracy_swap_averaged_p'):.3f}; {kinds}), each order alone "
          f"{rm.get('val_accuracy'):.3f}, KDE sigma {rm.get('val_score_kde_sigma'):.4f}, swap agreement "
          f"{rm.get('swap_agreement'):.3f}; kept {rm.get('selected_reason')}")
    print(f"  DRaFT-K (K={pol.get('k')} of {pol.get('num_steps')} steps, {pol.get('steps')} updates): held-out reward "
          f"{pol.get('heldout_reward_start'):.4f} -> {pol.get('heldout_reward_end'):.4f}, KL to the soup at most "
          f"{pol.get('max_heldout_kl'):.5f}; pipeline {pol.get('pipeline_dir')}")
    _print_gated(RL_COMPARISON, "RL release", sbs, release)


def _print_sft(parts: Any, soup: Any, sbs: Any, release: Any) -> None:
    meta, plan = soup.metadata("sft_soup"), parts.metadata("sft_partitions")
    print(f"\nSFT: {plan.get('items')} items -> partitions {plan.get('partitions')} (caption variants by "
          f"{plan.get('rewriter')}: {plan.get('variant_sources')})")
    example = plan.get("example_variants") or {}
    print(f"  variants of one item (the trainer draws one (language, length) pair per step): "
          f"{ {lang: [by_len.get(k) for k in ('short', 'very_short')] for lang, by_len in example.items()} }")
    print(f"  soup weights {meta.get('weights')}; validation loss on the union of the partitions' validation items: "
          f"soup {meta.get('soup_val_loss'):.6f} vs members' mean {meta.get('members_mean_val_loss'):.6f} "
          f"(members {meta.get('member_val_loss')}); pipeline {meta.get('pipeline_dir')}")
    _print_gated(SFT_COMPARISON, "soup release", sbs, release)


def _print_editing(main_run: Any) -> None:
    """The Image Editing chain of main_job: mined pairs -> edit latent shards -> the editing stages (report §6.3.1)."""
    cands, pairs = main_run.metadata("edit_candidates"), main_run.metadata("edit_pairs")
    shards = main_run.metadata("edit_latent_shards")
    print(f"\nImage editing: edit_candidates {cands.get('candidates')} of {cands.get('all_pairs')} possible pairs -> "
          f"edit_pairs kept {pairs.get('kept')}, dropped {pairs.get('dropped')} {pairs.get('drop_histogram')} -> "
          f"edit_latent_shards {shards.get('samples')} edit samples -> train_image_edit_mr -> train_image_edit_hr")
    for stage in ("image_edit_mr", "image_edit_hr"):
        meta = main_run.metadata(f"train_{stage}")
        print(f"  {stage}: edit 80% / t2i 20% on the mined pairs, pipeline {meta.get('pipeline_dir')}")


def main() -> int:
    offline_env()
    paths = K5Paths.from_env().ensure()
    # DagsterInstance.get() reads DAGSTER_HOME; set it before Dagster is imported so nothing caches another value.
    os.environ["DAGSTER_HOME"] = str(paths.dagster_home)

    from dagster import DagsterInstance

    from assets.curation import SHARDS
    from assets.sbs import DEMO_COMPARISON, DEMO_SBS_RUN_CONFIG
    from assets.sft_data import DEMO_SFT_RUN_CONFIG
    from assets.sft_models import START_STAGES
    from orchestration.launch import code_location, run_job
    from orchestration.registry import release_status

    print(f"K5_HOME: {paths.home}", flush=True)
    t0 = time.perf_counter()
    with DagsterInstance.get() as instance, code_location(instance, in_process=True) as ws:
        def run(job: str, key: str | None = None, config: dict | None = None) -> Any:
            return run_job(job, instance=instance, workspace=ws, partition_key=key,
                           run_config={**LOGS, **(config or {})})

        for key in SHARDS.get_partition_keys():  # partitioned: one run per source shard
            if not _report(f"curation shard {key}", run("curation_shards_job", key)):
                return 1
        sft_start = f"train_{START_STAGES[FAMILY]}"
        main_config = {"ops": {**DEMO_SFT_RUN_CONFIG["ops"], sft_start: SFT_START_CONFIG}}
        main_run = run("main_job", config=main_config)  # SFT questionnaires: simulated annotators
        if not _report("main_job", main_run):
            return 1
        sbs_config = DEMO_SBS_RUN_CONFIG["ops"]["sbs_report"]["config"]
        sbs = run("sbs_job", DEMO_COMPARISON,
                  {"ops": {"sbs_report": {"config": {**sbs_config, "p_a": SIMULATED_PREFERENCE}}}})
        if not _report(f"sbs_job {DEMO_COMPARISON}", sbs):
            return 1
        gates = []
        for margin in (STRICT_MARGIN, 0.0):
            release = run("release_job", FAMILY, {"ops": {"release": {"config": {"margin": margin}}}})
            # a gate that keeps the champion fails its blocking check on purpose; only a broken release is an error
            if not _report(f"release_job {FAMILY} (margin {margin})", release, gate_may_keep=True):
                return 1
            gates.append((margin, release.metadata("release"), release.check_evaluations))
        sft_runs = _sft_chain(run, sbs_config)
        if sft_runs is None:
            return 1
        distill_runs = _distill_chain(run, sbs_config)
        if distill_runs is None:
            return 1
        rl_runs = _rl_chain(run, sbs_config)
        if rl_runs is None:
            return 1
        elapsed = time.perf_counter() - t0

    print(f"\nThe lineage ran in {elapsed:.1f} s; runs are in the Dagster UI (job history and Overview timeline).")
    print("Curated dataset:", _scalars(dict(main_run.metadata("curated_dataset"))))
    print("Latent shards:", _scalars(dict(main_run.metadata("latent_shards"))))
    sft = {k: main_run.metadata(k).get("rows") for k in ("sft_v1", "sft_v2", "sft_mix")}
    print(f"SFT datasets from SIMULATED annotators: v1 {sft['sft_v1']} rows, v2 {sft['sft_v2']} rows, mix "
          f"{sft['sft_mix']} rows (p_v1={main_run.metadata('sft_mix').get('p_v1')}); annotate for real with "
          f"`python -m ui.sft_task serve-demo {paths.home / 'sft'}`")
    last = main_run.metadata("train_video_lite_mr_10s")
    print(f"Last Video Lite stage: pipeline {last.get('pipeline_dir')}, {last.get('samples_consumed')} samples / "
          f"{last.get('tokens_consumed')} tokens consumed, MLflow run {last.get('mlflow_run')}")
    report = sbs.metadata("sbs_report")
    print(f"SBS {DEMO_COMPARISON}: {report.get('judgments')} SIMULATED judgments (raters prefer A with p="
          f"{SIMULATED_PREFERENCE}); report {report.get('report_html')}")
    for group in ("overall_visual_quality", "overall_motion", "overall_prompt_following"):
        print(f"  {group}: {report.get(group)}")
    for margin, meta, checks in gates:
        decisions = [f"{c.check_name} {'passed' if c.passed else 'did not pass'}: "
                     f"{c.metadata['decision'].value} - {c.metadata['reason'].value}"
                     for c in checks if c.check_name == "champion_gate"]
        print(f"\nRelease with margin {margin}: version {meta.get('version')} -> {meta.get('source_uri')}")
        for line in decisions:
            print(f"  {line}")
    _print_editing(main_run)
    _print_sft(*sft_runs)
    _print_distill(*distill_runs)
    _print_rl(*rl_runs)
    print("\nRegistry now:")
    for line in release_status(paths.mlflow_tracking_uri, FAMILY):
        print(f"  {line}")
    print("\nWhere to look:")
    print("  Dagster UI: make ui -> http://127.0.0.1:3000 (runs, asset lineage, checks)")
    print("  MLflow UI:  make ui -> http://127.0.0.1:5000 (stage runs under their lineage runs, the registry's "
          f"k5-{FAMILY} model)")
    print(f"  state:      {paths.home} (Dagster: {paths.dagster_home}, MLflow: {paths.mlflow_db}, "
          f"objects: {paths.object_store}, models: {paths.models}); set K5_HOME to keep it elsewhere")
    return 0


if __name__ == "__main__":
    sys.exit(main())
