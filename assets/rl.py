"""RL post-training assets (report §6.6; group ``rl``), after the SFT soup:

``reward_pairs`` (heuristic pairs, no human labels: pre-trained < SFT < real SFT image, both positions) ->
``reward_model`` (relative Qwen2.5-VL reward, R = P("Yes"), checkpoint chosen by the KDE σ criterion) -> ``rl_model``
(DRaFT-K from the SFT soup with a KL anchor, exported as a complete pipeline folder). The SBS comparison
``rl_vs_soup`` reads ``rl_model``; ``release`` with ``rl_model: true`` registers it behind the gate. Both training
jobs run through Pipes like the stages (``orchestration.rl_runs``), each with an MLflow run.

Demo-scale defaults; ``PRODUCTION_RL`` holds the production settings (Image Lite at 1024², the 7B reward model).
"""

# No `from __future__ import annotations`: Dagster resolves the Config classes from live annotations.
import dagster as dg
from pydantic import Field

from orchestration.lineage import latest_metadata
from orchestration.resources import K5HomeResource, MLflowResource, TrainingJobResource

PRODUCTION_RL = {"reward_pairs": {"height": 1024, "width": 1024, "num_steps": 50, "guidance_scale": 3.5},
                 "reward_model": {"base_model": "models/Qwen2.5-VL-7B-Instruct", "dtype": "bfloat16", "device": "cuda",
                                  "steps": 2000, "batch": 16, "lr": 1e-6, "eval_every": 100},
                 "rl_model": {"height": 1024, "width": 1024, "num_steps": 50, "k": 10, "steps": 1000, "lr": 1e-6,
                              "guidance_scale": 3.5, "device": "cuda", "eval_every": 50, "sample_every": 50,
                              "offload_to_cpu": True}}


class RewardPairsConfig(dg.Config):
    height: int = Field(64, description="image height of the generations and the resized real images")
    width: int = Field(64, description="image width")
    num_steps: int = Field(4, description="sampler steps of both lineage models")
    guidance_scale: float = Field(5.0, description="CFG weight of both generations")
    val_fraction: float = Field(0.4, description="share of SFT items held out (reward validation, RL held-out)")
    max_items: int | None = Field(None, description="use at most this many SFT items; None: all")
    seeds_per_item: int = Field(2, description="generations per item and model (each gives its own pairs)")


class RewardModelConfig(dg.Config):
    base_model: str = Field("tiny", description="Qwen2.5-VL folder (relative to K5_HOME or absolute; production: "
                            "Qwen2.5-VL-7B-Instruct); 'tiny': a tiny random Qwen2.5-VL (demo)")
    steps: int = Field(16, description="optimizer steps")
    batch: int = Field(4, description="(better, worse) pairs per step, each trained in both orders")
    lr: float = Field(3e-3, description="AdamW learning rate")
    eval_every: int = Field(4, description="steps between validations (each a checkpoint candidate)")
    device: str = Field("cpu", description="torch device")
    dtype: str = Field("float32", description="float32 or bfloat16 weights")


class RlModelConfig(dg.Config):
    steps: int = Field(6, description="DRaFT-K policy updates")
    batch: int = Field(1, description="prompts per update")
    lr: float = Field(1e-3, description="AdamW learning rate (production: 1e-6)")
    num_steps: int = Field(4, description="sampler steps N")
    k: int = Field(2, description="last steps back-propagated (report: 10 for images)")
    beta_kl: float = Field(2e-2, description="KL anchor weight (report: 2e-2)")
    guidance_scale: float = Field(5.0, description="CFG weight of the rollouts")
    height: int = Field(64, description="generated height")
    width: int = Field(64, description="generated width")
    eval_every: int = Field(2, description="steps between held-out evaluations")
    sample_every: int = Field(2, description="steps between sample grids")
    offload_to_cpu: bool = Field(False, description="keep saved step inputs in host memory (GPU memory plan)")
    device: str = Field("cpu", description="torch device")


@dg.asset(group_name="rl", kinds={"pytorch"}, owners=["team:k5-lifecycle"], deps=["sft_soup", "sft_mix"],
          description="Heuristic reward pairs (report §6.6): per SFT prompt an image of the pre-trained stage < one of "
          "the SFT soup < the real SFT image; all three pairs in both positions, with which model made each side.")
def reward_pairs(context: dg.AssetExecutionContext, config: RewardPairsConfig,
                 k5_home: K5HomeResource) -> dg.MaterializeResult:
    import pandas as pd

    from orchestration.rl_runs import PairSettings, build_reward_pairs

    soup = latest_metadata(context, "sft_soup")
    rows = pd.read_parquet(str(latest_metadata(context, "sft_mix")["path"])).to_dict("records")
    out = k5_home.paths.models / "rl" / "reward_pairs"
    summary = build_reward_pairs(rows, str(soup["start_pipeline"]), str(soup["pipeline_dir"]), out,
                                 PairSettings(**config.model_dump()), log=context.log.info)
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
    from k5model.rl.jobs import RewardTrainJob
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
    from k5model.rl.jobs import DraftTrainJob
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
