"""Distillation (issue 18): CFG-distillation target and loss, TSCD boundaries/loss/sampling grid, adversarial hinge,
re-noising and grid-agnostic discriminator, sampling settings saved with a folder, and the demo-scale acceptance."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from k5model import CrossDiT, get_preset
from k5model.distill.adversarial import (
    AdversarialConfig,
    TeacherFeatureDiscriminator,
    hinge_discriminator_loss,
    hinge_generator_loss,
    renoise,
    train_adversarial,
)
from k5model.distill.cfg_distill import CFGDistillConfig, cfg_distill_loss, guided_target, train_cfg_distill
from k5model.distill.common import DistillSet, frozen_copy, model_input, stack_text
from k5model.distill.evaluate import TinyAcceptance, random_text, tiny_acceptance
from k5model.distill.settings import SamplingSettings, read_sampling_settings, write_sampling_settings
from k5model.distill.tscd import _fine_points, segment_boundaries, tscd_loss
from k5model.flow_matching import predict_velocity
from k5model.sampling import sample, sampling_grid
from k5model.synthetic import randomize

SHAPE = (2, 3, 4, 4, 16)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher() -> CrossDiT:
    return frozen_copy(randomize(CrossDiT(get_preset("tiny")), std=0.1, seed=0))


def data_set(n: int = 4) -> DistillSet:
    g = torch.Generator().manual_seed(7)
    return DistillSet(torch.randn(n, *SHAPE[1:], generator=g), stack_text([random_text(i) for i in range(n)]))


def test_guided_target_is_cfg_with_the_null_prompt_and_loss_decides_both_ways(teacher):
    cond, null = stack_text([random_text(1), random_text(2)]), random_text(9, length=2)
    x, t = torch.randn(SHAPE), torch.tensor([0.7, 0.3])
    v_c = predict_velocity(teacher, model_input(teacher, x), cond, t)
    v_u = predict_velocity(teacher, model_input(teacher, x), stack_text([null, null]), t)
    assert torch.allclose(guided_target(teacher, x, t, cond, null, 5.0), v_u + 5.0 * (v_c - v_u), atol=1e-5)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    student = copy.deepcopy(teacher)
    assert cfg_distill_loss(student, teacher, x0, noise, t, cond, null, 1.0).item() < 1e-10  # w=1: already there
    assert cfg_distill_loss(student, teacher, x0, noise, t, cond, null, 5.0).item() > 1e-4


def test_cfg_distill_keeps_key_names_and_refuses_a_trainable_teacher(teacher):
    student = copy.deepcopy(teacher).requires_grad_(True)
    with pytest.raises(ValueError, match="teacher must be frozen"):
        train_cfg_distill(student, student, data_set(), random_text(9), CFGDistillConfig(steps=1))
    history = train_cfg_distill(student, teacher, data_set(), random_text(9),
                                CFGDistillConfig(steps=2, lr=1e-3, shift=5.0, batch_size=2))
    assert len(history) == 2 and all(h["loss"] > 0 for h in history)
    assert list(student.state_dict()) == list(teacher.state_dict())  # same architecture, no guidance embedding
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters(), strict=True))


def test_segment_boundaries_are_the_shifted_grid_and_the_sampler_visits_them(teacher):
    b = segment_boundaries(16, 10.0)
    assert len(b) == 17 and b == [float(t) for t in sampling_grid(16, 10.0)]
    kw = dict(latent_shape=(1, *SHAPE[1:]), cond=random_text(1), num_steps=16, shift=10.0, progress=False)
    assert torch.equal(sample(teacher, timesteps=b, **kw), sample(teacher, **kw))
    other = segment_boundaries(16, 3.0)
    assert not torch.equal(sample(teacher, timesteps=other, **kw), sample(teacher, **kw))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(teacher, timesteps=b[:-1] + [0.5], **kw)


def test_tscd_loss_anchors_the_last_substep_to_the_teacher(teacher):
    points = _fine_points(torch.tensor(segment_boundaries(4, 5.0)), 2)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    cond = stack_text([random_text(1), random_text(2)])
    segment, last = torch.tensor([0, 3]), torch.tensor([1, 1])
    # from the last sub-point the target is one teacher step to the boundary: the teacher itself has zero loss
    assert tscd_loss(teacher, teacher, teacher, x0, noise, cond, points, segment, last).item() < 1e-10
    other = frozen_copy(randomize(CrossDiT(get_preset("tiny")), std=0.1, seed=1))
    assert tscd_loss(other, teacher, other, x0, noise, cond, points, segment, last).item() > 1e-4
    # from the first sub-point the target chains a teacher step with the target network's jump
    assert tscd_loss(teacher, teacher, teacher, x0, noise, cond, points, segment, torch.tensor([0, 0])).item() > 0


def test_hinge_losses_and_renoising():
    assert hinge_discriminator_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0  # confident and right
    assert hinge_discriminator_loss(torch.tensor([-1.0]), torch.tensor([1.0])).item() == 4.0  # confident and wrong
    assert hinge_generator_loss(torch.tensor([3.0, 1.0])).item() == -2.0
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4000, 1, 1, 1, 1)
    noisy, sigma = renoise(x, g)
    median = sigma.median().item()
    assert abs(median - torch.sigmoid(torch.tensor(-4.0)).item()) < 0.003 and sigma.quantile(0.99) < 0.2
    assert torch.allclose(noisy.flatten().std(), sigma.pow(2).mean().sqrt(), rtol=0.1)


def test_discriminator_works_for_any_grid_and_only_heads_and_student_train(teacher):
    disc = TeacherFeatureDiscriminator(teacher, head_dim=16)
    assert not any(n.startswith("_teacher") for n, _ in disc.named_parameters())
    for grid in ((3, 4, 4), (2, 6, 8)):
        logits = disc(torch.randn(2, *grid, 16), torch.tensor([0.02, 0.1]), stack_text([random_text(1)] * 2))
        assert logits.shape == (2,)
    with pytest.raises(ValueError, match="frozen"):
        TeacherFeatureDiscriminator(copy.deepcopy(teacher).requires_grad_(True))
    student = copy.deepcopy(teacher).requires_grad_(True)
    teacher_before = copy.deepcopy(teacher.state_dict())
    heads_before = copy.deepcopy(disc.heads.state_dict())
    history = train_adversarial(student, disc, data_set(), segment_boundaries(4, 5.0),
                                AdversarialConfig(steps=2, batch_size=2, generator_lr=1e-3))
    assert len(history) == 2 and {"d_loss", "g_loss"} <= set(history[0])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, disc.heads.state_dict()[k]) for k, v in heads_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters(), strict=True))


def test_sampling_settings_round_trip_and_magcache_is_off_for_boundary_models(tmp_path):
    assert read_sampling_settings(tmp_path) is None
    flash = SamplingSettings(kind="flash", num_steps=4, guidance_scale=1.0, shift=5.0,
                             timesteps=tuple(segment_boundaries(4, 5.0)))
    write_sampling_settings(tmp_path, flash)
    assert read_sampling_settings(tmp_path) == flash and flash.build_magcache() is None
    with pytest.raises(ValueError, match="MagCache is off"):
        SamplingSettings(num_steps=4, timesteps=flash.timesteps, magcache={"mag_ratios": {"cond": [1.0] * 4}})
    base = SamplingSettings(num_steps=4, magcache={"mag_ratios": {"cond": [1.0] * 4, "uncond": [1.0] * 4},
                                                   "config": {"threshold": 0.3}})
    cache = base.build_magcache()
    assert cache is not None and cache.config.threshold == 0.3 and cache.num_steps == 4
    (tmp_path / "sampling_config.json").write_text('{"num_steps": 4, "timesteps": [1.0, 0.0]}')
    with pytest.raises(ValueError, match="invalid sampling settings"):
        read_sampling_settings(tmp_path)


@pytest.mark.slow
def test_demo_scale_acceptance():
    figures = tiny_acceptance(TinyAcceptance(prompts=2, train_seeds=4, eval_seeds=(0,), train_steps=80,
                                             magcache=False))
    assert figures["cfg_distilled_50"] < figures["undistilled_50_nocfg"]
    assert figures["tscd_16"] < figures["cfg_distilled_16"]


@pytest.mark.slow
def test_distill_assets_export_loadable_folders_with_their_settings(tmp_path, tiny_t2v_dir):
    """The four assets from a recorded last Video Lite stage run as TrainJobs through the stages' Pipes path (a
    subprocess each), publish folders K5Pipeline samples with their own settings (Flash: 16 steps on its boundaries,
    guidance 1; the calibration: cached sampling) and log one MLflow run each under the distillation lineage run."""
    import dagster as dg
    from mlflow.tracking import MlflowClient

    import assets.distill as distill
    from k5model.pipeline import K5Pipeline
    from orchestration.resources import K5HomeResource, MLflowResource, TrainingJobResource

    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(dg.AssetMaterialization(distill.BASE_STAGE, metadata={
        "pipeline_dir": str(tiny_t2v_dir)}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resources = {"k5_home": K5HomeResource(home=str(tmp_path / "home")),
                 "mlflow": MLflowResource(tracking_uri=uri, artifact_location=str(tmp_path / "mlartifacts")),
                 "training_job": TrainingJobResource()}
    run_config = {"ops": {name: {"config": {"train_steps": 2, "reference_steps": 8, "latent_frames": 1}}
                          for name in ("cfg_distilled", "tscd_16nfe", "flash", "magcache_calibration")}}
    result = dg.materialize([distill.cfg_distilled, distill.tscd_16nfe, distill.flash, distill.magcache_calibration],
                            instance=instance, resources=resources, run_config=run_config)
    assert result.success
    meta = {k: instance.get_latest_materialization_event(dg.AssetKey(k)).asset_materialization.metadata
            for k in ("cfg_distilled", "tscd_16nfe", "flash", "magcache_calibration")}
    assert meta["cfg_distilled"]["nfe"].value == 50 and meta["flash"]["nfe"].value == 16
    assert meta["tscd_16nfe"]["upstream_pipeline"].value == meta["cfg_distilled"]["pipeline_dir"].value
    assert meta["flash"]["steps"].value == 2 and "mse_to_guided_reference" in meta["flash"]
    assert not list((tmp_path / "home" / "models" / "distill").glob(".*.partial"))  # published: work folders gone
    record = json.loads(Path(meta["flash"]["pipeline_dir"].value).parent.joinpath("distill_metrics.json").read_text())
    assert record["pipeline_dir"] == meta["flash"]["pipeline_dir"].value  # the published record points at itself
    flash = K5Pipeline.from_pretrained(meta["flash"]["pipeline_dir"].value)
    assert flash.sampling.kind == "flash" and flash.sampling.guidance_scale == 1.0 and flash.sampling.magcache is None
    assert len(flash.sampling.timesteps) == 17
    assert flash.generate("a cat", height=64, width=64, num_frames=5, progress=False).frames.shape == (5, 64, 64, 3)
    cached = K5Pipeline.from_pretrained(meta["magcache_calibration"]["pipeline_dir"].value)
    out = cached.generate("a cat", height=64, width=64, num_frames=5, progress=False)
    assert out.timings["magcache_skipped"] > 0
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name(
        MLflowResource().experiment_name).experiment_id])
    by_kind = {r.data.tags["k5_kind"]: r for r in runs if "k5_kind" in r.data.tags}
    assert set(by_kind) == {"cfg_distilled", "tscd", "flash", "magcache_calibration"}
    assert by_kind["tscd"].info.status == "FINISHED" and "mse_to_guided_reference" in by_kind["tscd"].data.metrics
    assert "loss" in by_kind["tscd"].data.metrics  # logged live by the job, step by step


def test_k5_generate_samples_a_distilled_folder_with_its_own_settings(tmp_path, tiny_t2v_dir):
    """A TSCD export: ``k5 generate`` without --steps/--guidance runs its 16 saved boundaries at guidance 1; an
    explicit --steps overrides (plain shifted grid); the base folder keeps the defaults (50 steps, CFG 5)."""
    from click.testing import CliRunner

    from k5cli.main import main as cli
    from k5model.distill.export import DistillStageSpec, run_distill_stage

    spec = DistillStageSpec(kind="tscd", train_steps=1, reference_steps=4, data_steps=2, train_seeds=1,
                            prompts=("a cat",), latent_grid=(1, 4, 4))
    folder = run_distill_stage(spec, base_dir=tiny_t2v_dir, upstream_dir=tiny_t2v_dir,
                               out_dir=tmp_path / "tscd")["pipeline_dir"]
    args = ["generate", "--prompt", "a cat", "--height", "64", "--width", "64", "--frames", "5", "--no-progress"]
    own = CliRunner().invoke(cli, [*args[:1], folder, *args[1:], "--out", str(tmp_path / "a.mp4")])
    assert own.exit_code == 0, own.output
    assert "16 steps, guidance 1, segment_boundaries grid" in own.output
    other = CliRunner().invoke(cli, [*args[:1], folder, *args[1:], "--out", str(tmp_path / "b.mp4"), "--steps", "3"])
    assert other.exit_code == 0 and "3 steps, guidance 1, shifted grid" in other.output
    base = CliRunner().invoke(cli, [*args[:1], str(tiny_t2v_dir), *args[1:], "--out", str(tmp_path / "c.mp4"),
                                    "--steps", "2"])
    assert base.exit_code == 0 and "2 steps, guidance 5, shifted grid" in base.output
