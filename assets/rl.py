"""RL post-training assets (report §6.6; group ``rl``), after the SFT soup:

``reward_pairs`` (heuristic pairs, no human labels: pre-trained < SFT < real SFT image, both positions) ->
``reward_model`` (relative Qwen2.5-VL reward, R = P("Yes"), checkpoint chosen by the KDE σ criterion) -> ``rl_model``
(DRaFT-K from the SFT soup with a KL anchor, exported as a complete pipeline folder). The SBS comparison
``rl_vs_soup`` reads ``rl_model``; ``release`` with ``rl_model: true`` registers it behind the gate. Both training
jobs run through Pipes like the stages (``orchestration.rl_runs``), each with an MLflow run.

The Config classes are generated from the library specs (``PairSettings``, ``RewardTrainJob``, ``DraftTrainJob``:
their fields, types and docstrings) less the fields each asset fills from the lineage; their defaults are demo scale
(``DEMO_RL``), ``PRODUCTION_RL`` holds the production settings (Image Lite at 1024², the 7B reward model).
"""

# No `from __future__ import annotations`: Dagster resolves the Config classes from live annotations.
import dagster as dg

from k5data.reward_pairs import PairSettings
from k5model.rl.jobs import DraftTrainJob, RewardTrainJob
from orchestration.config_specs import config_from_spec
from orchestration.lineage import latest_metadata
from orchestration.resources import K5HomeResource, MLflowResource, TrainingJobResource

# The assets' config defaults: demo scale, what `make demo` runs (64x64, 4 Euler steps, K = 2, a tiny random reward
# VLM); fields not named here take their spec's default. base_model is the one asset-only field.
DEMO_RL = {"reward_pairs": {"seeds_per_item": 2},
           "reward_model": {"base_model": "tiny", "steps": 16, "lr": 3e-3, "eval_every": 4},
           "rl_model": {"steps": 6, "lr": 1e-3, "num_steps": 4, "k": 2, "height": 64, "width": 64, "eval_every": 2,
                        "sample_every": 2}}
PRODUCTION_RL = {"reward_pairs": {"height": 1024, "width": 1024, "num_steps": 50, "guidance_scale": 3.5},
                 "reward_model": {"base_model": "models/Qwen2.5-VL-7B-Instruct", "dtype": "bfloat16", "device": "cuda",
                                  "steps": 2000, "batch": 16, "lr": 1e-6, "eval_every": 100},
                 "rl_model": {"height": 1024, "width": 1024, "num_steps": 50, "k": 10, "steps": 1000, "lr": 1e-6,
                              "guidance_scale": 3.5, "device": "cuda", "eval_every": 50, "sample_every": 50,
                              "offload_to_cpu": True}}
# spec fields each asset fills from the lineage (not config)
LINEAGE_FIELDS = {"reward_model": frozenset({"pairs", "base_model", "out"}),
                  "rl_model": frozenset({"policy", "reward_model", "pairs", "out"})}
BASE_MODEL_HELP = ("Qwen2.5-VL folder the reward model starts from, relative to K5_HOME or absolute (production: "
                   "Qwen2.5-VL-7B-Instruct); 'tiny': a tiny random Qwen2.5-VL from the pipeline's tokenizer (demo)")

RewardPairsConfig = config_from_spec("RewardPairsConfig", PairSettings, module=__name__,
                                     defaults=DEMO_RL["reward_pairs"])
RewardModelConfig = config_from_spec("RewardModelConfig", RewardTrainJob, module=__name__,
                                     defaults=DEMO_RL["reward_model"], exclude=LINEAGE_FIELDS["reward_model"],
                                     extra={"base_model": (str, BASE_MODEL_HELP)})
RlModelConfig = config_from_spec("RlModelConfig", DraftTrainJob, module=__name__, defaults=DEMO_RL["rl_model"],
                                 exclude=LINEAGE_FIELDS["rl_model"])


@dg.asset(group_name="rl", kinds={"pytorch"}, owners=["team:k5-lifecycle"], deps=["sft_soup", "sft_mix"],
          description="Heuristic reward pairs (report §6.6): per SFT prompt an image of the pre-trained stage < one of "
          "the SFT soup < the real SFT image; all three pairs in both positions, with which model made each side.")
def reward_pairs(context: dg.AssetExecutionContext, config: RewardPairsConfig,
                 k5_home: K5HomeResource) -> dg.MaterializeResult:
    import shutil

    from k5data.reward_pairs import build_reward_pairs, read_sft_items
    from orchestration.stage_runs import hold_stage, publish, work_dir

    out = k5_home.paths.models / "rl" / "reward_pairs"
    work = work_dir(out)
    # one writer; written aside and swapped in whole, so a failed run leaves the last good table and its images
    with hold_stage(out, f"Dagster run {context.run_id}", asset="reward_pairs") as lease:
        soup = latest_metadata(context, "sft_soup")
        rows = read_sft_items(str(latest_metadata(context, "sft_mix")["path"]))
        shutil.rmtree(work, ignore_errors=True)  # seeded generation: an attempt starts afresh, nothing to resume
        summary = build_reward_pairs(rows, str(soup["start_pipeline"]), str(soup["pipeline_dir"]), work,
                                     PairSettings(**config.model_dump()), log=context.log.info)
        lease.check()
        publish(work, out)
    return dg.MaterializeResult(metadata={
        **{k: v for k, v in summary.items() if k != "settings"}, "path": dg.MetadataValue.path(str(out /
                                                                                                  "pairs.parquet")),
        "pretrain_pipeline": str(soup["start_pipeline"]), "pretrain_stage": str(soup["start_stage"]),
        "sft_pipeline": str(soup["pipeline_dir"]), "family": str(soup["family"])})


@dg.asset(group_name="rl", kinds={"pytorch", "mlflow"}, owners=["team:k5-lifecycle"], deps=["reward_pairs"],
          pool="gpu", description="Relative reward model (Qwen2.5-VL, R = P('Yes' | first better)) trained on the "
          "reward pairs through the stages' Pipes path; validation loss/accuracy, score distribution and its KDE σ "
          "per evaluation in MLflow; the checkpoint with the largest σ among the accurate ones is kept.")
def reward_model(context: dg.AssetExecutionContext, config: RewardModelConfig, k5_home: K5HomeResource,
                 mlflow: MLflowResource, training_job: TrainingJobResource) -> dg.MaterializeResult:
    from orchestration.rl_runs import run_tracked, tiny_reward_base
    from orchestration.stage_runs import work_dir

    pairs = latest_metadata(context, "reward_pairs")
    base = tiny_reward_base(k5_home.paths, str(pairs["sft_pipeline"])) if config.base_model == "tiny" \
        else k5_home.paths.home / config.base_model
    final = k5_home.paths.models / "rl" / "reward_model"
    job = RewardTrainJob(pairs=str(pairs["path"]), base_model=str(base), out=str(work_dir(final)),
                         **config.model_dump(exclude={"base_model"}))
    summary, url = run_tracked(context, mlflow, training_job, "reward", job, final, {"k5_base_model": str(base)})
    return dg.MaterializeResult(metadata={**summary, "mlflow_run": dg.MetadataValue.url(url),
                                          "base_model": str(base), "path": summary["selected_dir"]})


@dg.asset(group_name="rl", kinds={"pytorch", "mlflow"}, owners=["team:k5-lifecycle"],
          deps=["reward_model", "reward_pairs", "sft_soup"], pool="gpu",
          description="DRaFT-K from the SFT soup against the reward model (grad through the last K sampler steps, "
          "KL anchor to the frozen soup, uncond branch without grad) through Pipes; held-out reward, KL, image "
          "statistics and sample grids in MLflow; exported as a complete pipeline folder.")
def rl_model(context: dg.AssetExecutionContext, config: RlModelConfig, k5_home: K5HomeResource,
             mlflow: MLflowResource, training_job: TrainingJobResource) -> dg.MaterializeResult:
    from orchestration.rl_runs import export_rl_pipeline, run_tracked
    from orchestration.stage_runs import work_dir

    soup, pairs = latest_metadata(context, "sft_soup"), latest_metadata(context, "reward_pairs")
    final = k5_home.paths.models / "rl" / "rl_model"
    job = DraftTrainJob(policy=str(soup["pipeline_dir"]), reward_model=str(latest_metadata(context, "reward_model")
                                                                            ["path"]),
                        pairs=str(pairs["path"]), out=str(work_dir(final)), **config.model_dump())
    summary, url = run_tracked(context, mlflow, training_job, "draft", job, final, {"k5_policy": job.policy},
                               finish=lambda work: export_rl_pipeline(work, soup["pipeline_dir"]))
    pipeline = final / "pipeline"
    return dg.MaterializeResult(metadata={
        **summary, "pipeline_dir": str(pipeline), "transformer_dir": str(final / "transformer"),
        "family": str(soup["family"]), "start_pipeline": str(soup["pipeline_dir"]),
        "start_stage": str(soup["start_stage"]), "mlflow_run": dg.MetadataValue.url(url)})


rl_assets = [reward_pairs, reward_model, rl_model]
