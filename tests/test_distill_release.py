"""Distilled models on the release path (issue 18): the distillation TrainJob section, the Flash comparison and
lineage name, SBS generation with a folder's own sampling settings, and a released (published, content-addressed)
Flash folder loading in diffusers' ``Kandinsky5T2VPipeline`` and in ``k5 generate`` with its own settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory: pytest.TempPathFactory, tiny_t2v_dir: Path) -> Path:
    """A tiny TSCD export, then Flash from it (1 optimiser step each: the folders, not the quality, are tested)."""
    from k5model.distill.export import DistillStageSpec, run_distill_stage

    root = tmp_path_factory.mktemp("flash")
    kw = dict(train_steps=1, reference_steps=2, data_steps=2, train_seeds=1, prompts=("a cat",), latent_grid=(1, 4, 4),
              batch_size=1)
    tscd = run_distill_stage(DistillStageSpec(kind="tscd", **kw), base_dir=tiny_t2v_dir, upstream_dir=tiny_t2v_dir,
                             out_dir=root / "tscd" / "pipeline")["pipeline_dir"]
    return Path(run_distill_stage(DistillStageSpec(kind="flash", **kw), base_dir=tiny_t2v_dir, upstream_dir=tscd,
                                  out_dir=root / "flash" / "pipeline")["pipeline_dir"])


def test_distill_section_of_the_train_job_round_trips_and_is_validated():
    from k5model.training.job import TrainJob

    plain = TrainJob.from_flat(out="/tmp/run")
    assert "distill" not in json.loads(plain.to_json())  # pre-training jobs (and the k8s templates) are unchanged
    job = plain.replace(distill="tscd", distill_teacher="/m/teacher", distill_from="/m/cfg", steps=3)
    assert TrainJob.from_json(job.to_json()) == job and job.flat()["distill_reference_steps"] == 100
    with pytest.raises(ValueError, match="not one of"):
        plain.replace(distill="consistency", distill_teacher="/m/teacher")
    with pytest.raises(ValueError, match="distill_teacher"):
        plain.replace(distill="flash")


def test_flash_comparison_and_lineage_name():
    from evaluation.model_card import ReleaseLineage
    from evaluation.sbs.comparisons import COMPARISONS, FLASH_TEACHER_STAGE, LineageModel, resolve_model

    comparison = COMPARISONS[f"flash_vs_{FLASH_TEACHER_STAGE}"]
    assert str(comparison.model_a) == "distill:flash" and comparison.model_a.asset_key == "flash"
    assert str(comparison.model_b) == f"stage:{FLASH_TEACHER_STAGE}"
    with pytest.raises(ValueError, match="distill:bogus"):
        LineageModel.parse("distill:bogus")
    with pytest.raises(FileNotFoundError, match="materialize it first"):
        resolve_model(comparison.model_a, lambda s: Path("/nowhere"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_model(comparison.model_a, lambda s: Path("/nowhere"), asset_pipeline=lambda a: Path("/nowhere"))
    lineage = ReleaseLineage(family="video_lite", stage="flash", stages=(FLASH_TEACHER_STAGE, "flash"))
    assert lineage.lineage_name == "distill:flash"  # what the gate matches against the SBS summary's model A


def test_sbs_generation_uses_a_distilled_folders_own_settings(flash_dir, tiny_t2v_dir, tmp_path):
    """Flash samples its own 16 boundaries at guidance 1 (not the batch's 2 steps) unless own_sampling is off; a
    folder without settings keeps the batch's steps."""
    from evaluation.prompts import PromptRecord
    from evaluation.sbs.batch import BatchSettings, generate_side

    prompts = [PromptRecord(id="moviegen-0", prompt="a cat", source="moviegen")]
    logged: list[str] = []
    for folder, own in ((flash_dir, True), (flash_dir, False), (tiny_t2v_dir, True)):
        settings = BatchSettings(num_steps=2, num_frames=5, own_sampling=own)
        generate_side(folder, prompts, settings, (64, 64), tmp_path / f"{own}", "a", logged.append)
    own_lines = [line for line in logged if "own settings" in line]
    assert own_lines == ["a: sampling with the folder's own settings (flash, 16 steps, guidance 1)"]


def test_released_flash_folder_loads_in_diffusers_and_k5_generate_with_its_settings(flash_dir, tmp_path):
    """The Flash export published as a release (content-addressed copy, links followed): diffusers'
    ``Kandinsky5T2VPipeline`` loads it (the trained transformer, same key names) and samples it with the folder's
    steps and guidance; ``k5 generate`` samples it on its own 16 saved boundaries at guidance 1 without flags."""
    from click.testing import CliRunner
    from diffusers import Kandinsky5T2VPipeline
    from safetensors.torch import load_file

    from k5cli.main import main as cli
    from k5data.object_store import LocalStore
    from k5data.publish import publish_folder
    from k5model.distill.settings import read_sampling_settings

    published = publish_folder(flash_dir, LocalStore(tmp_path / "objects"), "video_lite")
    released = Path(published.uri.removeprefix("file://"))
    assert not any(p.is_symlink() for p in released.rglob("*"))  # a self-contained copy
    settings = read_sampling_settings(released)
    assert settings is not None and settings.kind == "flash" and settings.num_steps == 16
    assert settings.guidance_scale == 1.0 and settings.magcache is None and len(settings.timesteps) == 17

    pipe = Kandinsky5T2VPipeline.from_pretrained(released, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    trained = {}
    for f in sorted((released / "transformer").glob("*.safetensors")):
        trained.update(load_file(f))
    state = pipe.transformer.state_dict()
    assert set(trained) == set(state) and all(torch.equal(state[k], v) for k, v in trained.items())
    frames = pipe(prompt="a cat", height=64, width=64, num_frames=5, output_type="np",
                  generator=torch.Generator().manual_seed(0), **settings.diffusers_call_kwargs()).frames[0]
    assert frames.shape == (5, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(frames)).all())
    assert len(pipe.scheduler.timesteps) == 16  # its 16 NFE (guidance 1: one transformer call per step)

    args = ["generate", str(released), "--prompt", "a cat", "--height", "64", "--width", "64", "--frames", "5",
            "--no-progress", "--out", str(tmp_path / "flash.mp4")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "16 steps, guidance 1, segment_boundaries grid" in result.output
