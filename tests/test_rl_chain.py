"""RL post-training chain on tiny models (issue 17): reward pairs -> reward model (σ-chosen checkpoint) -> DRaFT-K ->
exported pipeline, through the library functions the assets and the Pipes job run; the Pipes job side itself
(``orchestration.pipes_rl``) as a subprocess with an MLflow run; ``k5 rl``; the assets' Config classes generated from
the specs."""

from __future__ import annotations

import dataclasses
import json
import os

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from k5data.reward_pairs import PairSettings, build_reward_pairs, split_items
from k5model.rl.jobs import DraftTrainJob, RewardTrainJob, read_pairs
from k5model.rl.reward import build_tiny_reward_model, select_checkpoint_by_kde_sigma
from orchestration.resources import MLflowResource, TrainingJobResource
from orchestration.rl_runs import export_rl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(seed: int, size: int = 48) -> np.ndarray:
    """A smooth 'real' image (gradients + a disc), unlike the tiny models' noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    base = np.stack([xx, yy, 1 - xx * yy], -1) * rng.uniform(0.5, 1.0, 3)
    disc = ((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - 0.5) ** 2 < 0.05)[..., None]
    return (np.clip(base + 0.3 * disc, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_t2v_dir):
    from PIL import Image

    root = tmp_path_factory.mktemp("rl")
    rows = []
    for k, caption in enumerate(["a red fox in snow", "a city street at night", "a bowl of fruit", "a calm lake"]):
        path = root / f"real_{k}.png"
        Image.fromarray(_photo(k)).save(path)
        rows.append({"item_id": f"item{k}", "kind": "image", "media_path": str(path), "caption": caption,
                     "domain": "d"})
    pd.DataFrame(rows).to_parquet(root / "items.parquet")  # the sft_mix table's columns the pairs read
    pairs = build_reward_pairs(rows, tiny_t2v_dir, tiny_t2v_dir, root / "pairs",
                               PairSettings(height=32, width=32, num_steps=2, val_fraction=0.5), log=lambda m: None)
    base = build_tiny_reward_model(root / "vlm", tokenizer_dir=tiny_t2v_dir / "tokenizer")
    return {"root": root, "pairs": pairs, "pairs_path": root / "pairs" / "pairs.parquet", "base": base,
            "policy": tiny_t2v_dir, "items_path": root / "items.parquet"}


def test_reward_pairs_hold_both_orders_and_their_sources(chain):
    rows = read_pairs(chain["pairs_path"])
    assert chain["pairs"]["items"] == 4 and len(rows) == 4 * 3 * 2
    assert {r["split"] for r in rows} == {"train", "val"}
    rank = {"pretrain": 0, "sft": 1, "real": 2}
    for r in rows:  # label 1 exactly when the first image comes from the better source
        assert r["label"] == int(rank[r["first_source"]] > rank[r["second_source"]])
        assert os.path.isfile(r["first_path"]) and f".{r['first_source']}.png" in r["first_path"]
    stored = pd.read_parquet(chain["pairs_path"])  # relative to the table's folder, so the folder can move
    assert not any(os.path.isabs(p) for p in [*stored["first_path"], *stored["second_path"]])
    assert rows[0]["first_path"] == str(chain["pairs_path"].parent / stored["first_path"][0])
    keys = {(r["item_id"], r["first_source"], r["second_source"]) for r in rows}
    assert all((i, b, a) in keys for i, a, b in keys)  # every pair in both positions
    assert split_items(["a", "b", "c"], 0.4) == split_items(["c", "b", "a"], 0.4)  # stable, order independent
    with pytest.raises(ValueError, match="at least 2"):
        split_items(["a"], 0.5)


def test_reward_training_keeps_the_sigma_checkpoint(chain):
    from k5model.rl.reward import RelativeRewardModel
    from k5model.rl.train_reward import train_reward_model

    out = chain["root"] / "reward"
    seen = []

    class Recorder:
        def on_step(self, step, metrics):
            seen.append((step, metrics))

    summary = train_reward_model(RewardTrainJob(pairs=str(chain["pairs_path"]), base_model=str(chain["base"]),
                                                out=str(out), steps=4, batch=2, lr=1e-3, eval_every=2),
                                 callbacks=[Recorder()])
    evals = json.loads((out / "evals.json").read_text())
    assert [e["step"] for e in evals] == [2, 4] and [s for s, _ in seen] == [1, 2, 3, 4]
    assert {"val_loss", "val_accuracy", "val_accuracy_swap_averaged", "val_score_kde_sigma",
            "swap_agreement"} <= set(seen[1][1])
    per_kind = {k for k in seen[1][1] if k.startswith("val_accuracy_swap_averaged_") and k.endswith("_vs_pretrain")}
    assert per_kind == {"val_accuracy_swap_averaged_sft_vs_pretrain", "val_accuracy_swap_averaged_real_vs_pretrain"}
    expected = select_checkpoint_by_kde_sigma([2, 4], [e["val_score_kde_sigma"] for e in evals],
                                              [e["val_accuracy_swap_averaged"] for e in evals],
                                              decisions=evals[0]["val_decisions"])
    assert summary["selected_step"] == expected.step and "swap-averaged" in summary["selected_reason"]
    scores = json.loads((out / "samples" / f"step_{expected.step}" / "scores.json").read_text())
    assert len(scores["score_forward"]) == summary["val_pairs"] and len(scores["kde_density"]) == 51
    rm = RelativeRewardModel.from_pretrained(out / "selected", dtype=torch.float32)  # the chosen one loads
    assert rm.yes_id != rm.no_id
    chain["reward_dir"] = out / "selected"


def test_draft_k_trains_the_policy_and_exports_a_pipeline(chain):
    from k5model.crossdit import CrossDiT
    from k5model.pipeline import K5Pipeline
    from k5model.rl.train_draft import train_draft

    if "reward_dir" not in chain:
        pytest.skip("needs the reward model of the previous test")
    out = chain["root"] / "draft"
    job = DraftTrainJob(policy=str(chain["policy"]), reward_model=str(chain["reward_dir"]),
                        pairs=str(chain["pairs_path"]), out=str(out), steps=2, lr=1e-3, num_steps=2, k=1,
                        height=32, width=32, eval_every=1, sample_every=2)
    summary = train_draft(job)
    hist = json.loads((out / "history.json").read_text())
    assert [e["step"] for e in hist["evals"]] == [0, 1, 2]
    assert hist["evals"][0]["heldout_kl"] == pytest.approx(0.0, abs=1e-9)  # the policy starts as the anchor
    assert hist["evals"][-1]["heldout_kl"] > 0.0 and 0 < summary["heldout_reward_end"] < 1
    assert all(np.isfinite(h["loss"]) for h in hist["train"]) and (out / "samples" / "step_2" / "grid.png").is_file()
    start = CrossDiT.from_pretrained(chain["policy"] / "transformer")
    trained = CrossDiT.from_pretrained(out / "transformer")
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), trained.state_dict().values()))
    pipeline = export_rl_pipeline(out, chain["policy"])
    image = K5Pipeline.from_pretrained(pipeline).generate("a fox", height=32, width=32, num_frames=1, num_steps=2,
                                                          progress=False)
    assert image.frames.shape == (1, 32, 32, 3)


def test_job_specs_round_trip_and_refuse_bad_input(tmp_path):
    job = DraftTrainJob(policy="p", reward_model="r", pairs="x.parquet", out="o", k=3, num_steps=5)
    assert DraftTrainJob.from_json(job.to_json()) == job
    (tmp_path / "job.json").write_text(job.to_json())
    assert DraftTrainJob.from_json(tmp_path / "job.json") == job
    with pytest.raises(ValueError, match="unknown fields"):
        RewardTrainJob.from_json('{"pairs": "a", "base_model": "b", "out": "c", "stepz": 3}')
    with pytest.raises(ValueError, match="1 <= k <= num_steps"):
        DraftTrainJob(policy="p", reward_model="r", pairs="x", out="o", k=6, num_steps=5)
    pd.DataFrame({"item_id": ["a"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lacks reward pair columns"):
        read_pairs(tmp_path / "bad.parquet")


@pytest.mark.slow  # a subprocess importing torch, transformers and MLflow, plus a fresh MLflow SQLite store
def test_reward_job_through_pipes_logs_an_mlflow_run(chain, tmp_path):
    """The reward job as the asset runs it: orchestration.pipes_rl in a subprocess, Dagster Pipes, an MLflow run under
    the rl lineage run with the evaluation metrics per step."""
    from mlflow.tracking import MlflowClient

    from orchestration.rl_runs import run_tracked
    from orchestration.stage_runs import work_dir

    final = tmp_path / "reward_model"
    job = RewardTrainJob(pairs=str(chain["pairs_path"]), base_model=str(chain["base"]), out=str(work_dir(final)),
                         steps=2, batch=2, eval_every=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    @dg.asset
    def reward_model(context, mlflow: MLflowResource, training_job: TrainingJobResource):
        summary, _ = run_tracked(context, mlflow, training_job, "reward", job, final, {})
        return dg.MaterializeResult(metadata={"selected_step": summary["selected_step"],
                                              "run": summary["mlflow_run_id"], "dir": summary["selected_dir"]})

    result = dg.materialize([reward_model], resources={
        "mlflow": MLflowResource(tracking_uri=uri, artifact_location=str(tmp_path / "art")),
        "training_job": TrainingJobResource(backend="subprocess")})
    meta = result.asset_materializations_for_node("reward_model")[0].metadata
    assert meta["dir"].value == str(final / "selected") and (final / "selected" / "config.json").is_file()
    assert not work_dir(final).exists()  # swapped in whole
    run = MlflowClient(uri).get_run(meta["run"].value)
    assert run.info.status == "FINISHED" and run.data.tags["k5_selected_step"] == str(meta["selected_step"].value)
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "val_score_kde_sigma")
    assert [m.step for m in history] == [1, 2]
    assert {"loss", "val_loss", "val_accuracy", "swap_agreement"} <= set(run.data.metrics)


def test_k5_rl_cli_runs_the_same_spec(chain, tmp_path):
    from click.testing import CliRunner

    from k5cli.main import main as k5

    out = CliRunner().invoke(k5, ["rl", "reward", "--pairs", str(chain["pairs_path"]), "--base-model",
                                  str(chain["base"]), "--out", str(tmp_path / "cli"), "--steps", "1", "--batch", "1"])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["selected_step"] == 1
    bad = CliRunner().invoke(k5, ["rl", "draft", "--pairs", "x.parquet"])
    assert bad.exit_code == 2 and "--policy" in bad.output


def test_k5_rl_pairs_builds_the_pairs_and_names_a_bad_items_table(chain, tmp_path):
    from click.testing import CliRunner

    from k5cli.main import main as k5

    tiny, out = str(chain["policy"]), tmp_path / "pairs"
    common = ["--pretrain", tiny, "--sft", tiny, "--out", str(out)]
    res = CliRunner().invoke(k5, ["rl", "pairs", "--items", str(chain["items_path"]), *common, "--height", "32",
                                  "--width", "32", "--num-steps", "2", "--val-fraction", "0.5", "--max-items", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "pairs.json").read_text())
    assert summary["items"] == 2 and summary["settings"]["max_items"] == 2  # the optional int option reached the spec
    rows = read_pairs(out / "pairs.parquet")
    assert len(rows) == summary["pairs"] == 2 * 3 * 2 and {r["split"] for r in rows} == {"train", "val"}
    missing = CliRunner().invoke(k5, ["rl", "pairs", "--items", str(tmp_path / "nope.parquet"), *common])
    assert missing.exit_code == 2 and "--items" in missing.output and "does not exist" in missing.output
    pd.read_parquet(chain["items_path"]).drop(columns=["caption"]).to_parquet(tmp_path / "nocap.parquet")
    bad = CliRunner().invoke(k5, ["rl", "pairs", "--items", str(tmp_path / "nocap.parquet"), *common])
    assert bad.exit_code == 2 and "--items" in bad.output and "['caption']" in bad.output


def _spec_default(spec: type, name: str):
    return next(f.default for f in dataclasses.fields(spec) if f.name == name)


@pytest.mark.parametrize("config_name, spec, asset, lineage", [
    ("RewardPairsConfig", PairSettings, "reward_pairs", set()),
    ("RewardModelConfig", RewardTrainJob, "reward_model", {"pairs", "base_model", "out"}),
    ("RlModelConfig", DraftTrainJob, "rl_model", {"policy", "reward_model", "pairs", "out"})])
def test_rl_configs_are_generated_from_the_specs(config_name, spec, asset, lineage):
    """Each asset's Config: exactly the spec's fields less those the asset fills from the lineage (+ the asset-only
    base_model), the spec's type and docstring, DEMO_RL's default where given, else the spec's."""
    import typing

    import assets.rl as rl_assets
    from k5model.training.job import field_docs

    config, docs = getattr(rl_assets, config_name), field_docs(spec)
    extra = {"base_model"} if asset == "reward_model" else set()
    assert issubclass(config, dg.Config)
    assert set(config.model_fields) == {f.name for f in dataclasses.fields(spec)} - lineage | extra
    demo, hints = rl_assets.DEMO_RL[asset], typing.get_type_hints(spec)
    for name, field in config.model_fields.items():
        assert field.default == demo.get(name, _spec_default(spec, name) if name not in extra else None), name
        if name not in extra:
            assert field.description == docs[name] and field.annotation == hints[name], name
    if extra:  # the one asset-only field: 'tiny' or a folder relative to K5_HOME
        assert config.model_fields["base_model"].default == "tiny"
        assert "K5_HOME" in config.model_fields["base_model"].description
    # what the asset builds from the config: the spec accepts every field
    lineage_values = {name: "x" for name in lineage}
    assert spec(**lineage_values, **config().model_dump(exclude=extra))


def test_config_from_spec_refuses_an_unknown_default_and_an_unfilled_required_field():
    from orchestration.config_specs import config_from_spec

    made = config_from_spec("C", RewardTrainJob, module=__name__, defaults={"steps": 3},
                            exclude=frozenset({"pairs", "base_model", "out"}))
    assert made().steps == 3 and made(steps=5).steps == 5 and made().batch == 4
    with pytest.raises(TypeError, match="stepz"):
        config_from_spec("C", RewardTrainJob, module=__name__, defaults={"stepz": 3},
                         exclude=frozenset({"pairs", "base_model", "out"}))
    with pytest.raises(TypeError, match="RewardTrainJob.pairs is required"):
        config_from_spec("C", RewardTrainJob, module=__name__, defaults={}, exclude=frozenset({"base_model", "out"}))


@pytest.mark.slow  # a subprocess importing torch, diffusers and transformers
def test_rl_step_bench_smoke():
    """bench.rl_step's CPU smoke mode: the GPU benchmark's code path (draft_k_loss with per-block activation
    checkpointing, VAE decoder and reward model in the graph, AdamW step) on tiny shapes."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "bench.rl_step", "--smoke"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["ok"] and 0 < res["reward"] < 1 and res["k"] == 2 and res["step_s"] > 0


def test_rl_vs_soup_is_a_comparison_and_the_gate_decides_both_ways(tmp_path):
    from evaluation.model_card import ReleaseLineage
    from evaluation.release_gate import OVERALL_GROUPS, decide
    from evaluation.sbs.comparisons import COMPARISONS, LineageModel, resolve_model

    c = COMPARISONS["rl_vs_soup"]
    assert (str(c.model_a), str(c.model_b)) == ("rl:rl", "sft:soup") and c.model_a.asset_key == "rl_model"
    with pytest.raises(ValueError, match="rl:rl"):
        LineageModel(kind="rl", ref="policy")
    folder = tmp_path / "rl_model"
    folder.mkdir()

    def where(asset: str):
        return folder if asset == "rl_model" else tmp_path / "elsewhere"

    with pytest.raises(FileNotFoundError, match="materialize rl_model"):
        resolve_model(c.model_a, lambda s: tmp_path, None, where)
    (folder / "model_index.json").write_text("{}")
    assert resolve_model(c.model_a, lambda s: tmp_path, None, where) == folder
    assert ReleaseLineage(family="video_lite", stage="rl_model", stages=("rl_model",)).lineage_name == "rl:rl"

    def summary(low: float) -> dict:
        return {"model_a": "rl:rl", "model_b": "sft:soup", "comparison": "rl_vs_soup",
                **{g: {"model1": 0.6, "model2": 0.4} for g in OVERALL_GROUPS},
                "ci95_diff": {g: [low, low + 0.3] for g in OVERALL_GROUPS}}

    assert decide(summary(0.05), candidate="rl:rl", champion="sft:soup", margin=0.0).promote
    kept = decide(summary(-0.05), candidate="rl:rl", champion="sft:soup", margin=0.0)
    assert not kept.promote and "does not beat the champion sft:soup" in kept.reason
