"""Instruct-editing regime (issue 15, report §6.3.1 / Figure 19b): the editing presets have the released editing
checkpoint's layout, an editing stage starts from its T2I parent, Qwen2.5-VL sees the source image in the edit prompt,
mined pairs (the edit_pairs contract, here built from real curated rows) become edit samples in the latent shards, the
Image Editing stage trains edit and t2i from them, and ``k5 generate --edit`` edits with the trained pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from k5data.latents.edit import edit_rows, encode_edit_pairs
from k5data.latents.encode import LatentConfig, LatentEncoders
from k5data.latents.shards import read_index, read_tar
from k5data.object_store import LocalStore
from k5model.config import CrossDiTConfig, get_preset
from k5model.crossdit import CrossDiT, widen_to_visual_cond
from k5model.training.stages import demo_scaling

CFG = LatentConfig.demo(progress=False)
PREFIX = "latents_edit"
# dit_params of the official editing config (kandinsky-5 configs/k5_lite_i2i_sft_hd.yaml)
OFFICIAL_I2I = {"instruct_type": "channel", "in_visual_dim": 16, "out_visual_dim": 16, "time_dim": 512,
                "patch_size": [1, 2, 2], "model_dim": 2560, "ff_dim": 10240, "num_text_blocks": 2,
                "num_visual_blocks": 50, "axes_dims": [32, 48, 48]}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_edit_presets_have_the_released_editing_layout() -> None:
    from diffusers import Kandinsky5Transformer3DModel

    full = get_preset("image_lite_edit")
    # the official config's instruct_type "channel" is diffusers' visual_cond: the same preset
    official = CrossDiTConfig.from_dict(OFFICIAL_I2I)
    assert official.visual_cond and official.to_dict() == {**full.to_dict(), "in_text_dim": official.in_text_dim}
    from accelerate import init_empty_weights

    with torch.device("meta"):  # full size without memory: key names and shapes only
        ours = CrossDiT(full)
    with init_empty_weights():
        ref = Kandinsky5Transformer3DModel(**{k: v for k, v in full.to_dict().items()
                                              if k not in ("attention_type",) and not k.startswith("attention_")})
    assert _shapes(ours.state_dict()) == _shapes(ref.state_dict())
    assert ours.state_dict()["visual_embeddings.in_layer.weight"].shape == (2560, 4 * 33)  # 16 + 16 + mask, 1x2x2
    with torch.device("meta"):
        t2i = CrossDiT(get_preset("image_lite"))
    assert t2i.state_dict()["visual_embeddings.in_layer.weight"].shape == (2560, 4 * 16)
    assert {k for k, v in _shapes(ours.state_dict()).items() if _shapes(t2i.state_dict())[k] != v} == {
        "visual_embeddings.in_layer.weight"}  # the only tensor the editing model adds to
    assert get_preset("tiny_image_edit").visual_cond and not get_preset("tiny_image").visual_cond


def test_editing_stage_starts_from_its_t2i_parent() -> None:
    torch.manual_seed(0)
    parent = CrossDiT(get_preset("tiny_image")).eval()
    for p in parent.parameters():  # zero-initialised modulations would hide the input projection
        torch.nn.init.normal_(p, std=0.05)
    edit = CrossDiT(get_preset("tiny_image_edit")).eval()
    edit.load_state_dict(widen_to_visual_cond(parent.state_dict(), edit.config))
    g = torch.Generator().manual_seed(1)
    x, text, pooled = torch.randn(1, 1, 4, 4, 16, generator=g), torch.randn(1, 3, 32, generator=g), torch.randn(1, 32)
    t = torch.tensor([500.0])
    rope = ([torch.arange(1), torch.arange(2), torch.arange(2)], torch.arange(3))
    source = torch.randn(1, 1, 4, 4, 16, generator=g)
    edit_in = torch.cat([x, source, torch.ones(1, 1, 4, 4, 1)], -1)
    with torch.no_grad():
        want = parent(x, text, t, pooled, *rope).sample
        got = edit(edit_in, text, t, pooled, *rope).sample
    assert torch.allclose(got, want, atol=1e-6)  # condition weights start at zero: the parent's function
    # once the condition weights move, the source changes the prediction
    with torch.no_grad():
        edit.visual_embeddings.in_layer.weight.normal_(std=0.05)
        other = edit(torch.cat([x, -source, torch.ones(1, 1, 4, 4, 1)], -1), text, t, pooled, *rope).sample
        assert not torch.allclose(edit(edit_in, text, t, pooled, *rope).sample, other)
    with pytest.raises(ValueError, match="cannot widen"):
        widen_to_visual_cond(parent.state_dict(), get_preset("tiny_image_edit", in_visual_dim=8))
    same = edit.state_dict()
    assert widen_to_visual_cond(same, edit.config) is same


def test_edit_prompt_shows_qwen_the_source_image(tiny_t2i_dir: Path) -> None:
    from k5model.encoders.text import QwenTextEncoder, edit_image_for_qwen

    qwen = QwenTextEncoder.from_pretrained(tiny_t2i_dir, dtype=torch.float32)
    rng = np.random.default_rng(0)
    img_a = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    shown = edit_image_for_qwen(img_a)
    assert shown.shape == (32, 48, 3)
    plain = qwen.encode(["make the sky red"], task="edit")
    with_a = qwen.encode(["make the sky red", "make the sky red"], task="edit",
                         images=[shown, edit_image_for_qwen(255 - img_a)])
    # the prompt's tokens, then vision start + image pads + vision end + <|im_end|>
    grid = qwen.image_processor(images=[Image.fromarray(shown)], return_tensors="pt")["image_grid_thw"][0]
    n_pads = int(grid.prod()) // qwen.image_processor.merge_size ** 2
    assert int(with_a.lengths[0]) == int(plain.lengths[0]) + n_pads + 3
    assert not torch.allclose(with_a.embeds[0], with_a.embeds[1])  # another source, another condition
    with pytest.raises(ValueError, match="images="):
        qwen.encode(["a cat"], task="image", images=[shown])


# ---------------------------------------------------------------------------------------------------------------------
# edit pairs -> latent shards -> training -> k5 generate --edit


def _photo(name: str) -> np.ndarray:
    import skimage

    return np.asarray(Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB").resize((384, 256)))


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Real curated rows: three shipped photos and an edit of one (a recoloured region) through `run_curation`."""
    from k5data.curation.config import load_config
    from k5data.curation.curate import run_curation
    from k5data.curation.output import read_dataset

    src = tmp_path_factory.mktemp("edit_corpus")
    astronaut = _photo("astronaut.png")
    recoloured = astronaut.copy()
    recoloured[40:160, 200:340] = recoloured[40:160, 200:340][..., ::-1]  # a region's colours swapped
    for name, img, caption in (("astronaut", astronaut, "A woman astronaut in an orange suit in front of a flag."),
                               ("astronaut_recoloured", recoloured, "A woman astronaut with a blue-toned flag."),
                               ("coffee", _photo("coffee.png"), "A cup of coffee on a saucer, seen from above."),
                               ("chelsea", _photo("chelsea.png"), "A tabby cat looking to the side.")):
        Image.fromarray(img).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(caption)
    out = tmp_path_factory.mktemp("edit_curated")
    cfg = load_config(None)
    run_curation(str(src), str(out), cfg, catalog_path=str(out / "catalog.duckdb"), progress=False)
    rows = read_dataset(str(out), cfg)
    assert len(rows) == 4
    return rows


@pytest.fixture(scope="module")
def pairs(curated: pd.DataFrame) -> pd.DataFrame:
    """The edit_pairs contract's columns: one kept pair, one dropped pair, one kept pair whose target is no curated
    image."""
    by = {Path(u).stem: r for u, r in zip(curated["source_uri"], curated.to_dict("records"))}

    def pair(src: str, dst: str, instruction: str, kept: bool, reason: str | None) -> dict:
        s, d = by[src], by.get(dst, {"media_id": "ghost", "source_uri": "file:///ghost.png", "width": 384,
                                     "height": 256})
        return {"pair_id": f"{s['media_id'][:8]}{d['media_id'][:8]}", "source_media_id": s["media_id"],
                "target_media_id": d["media_id"], "source_uri": s["source_uri"], "target_uri": d["source_uri"],
                "width": int(d["width"]), "height": int(d["height"]), "instruction": instruction, "kept": kept,
                "drop_reason": reason, "rule": "dino_inliers" if kept else None, "clip_sim": 0.9, "dino_sim": 0.9,
                "face_sim": 0.0, "aligned_dino_sim": 0.9, "inliers": 400, "sft": False}

    return pd.DataFrame([
        pair("astronaut", "astronaut_recoloured", "Turn the flag blue.", True, None),
        pair("chelsea", "coffee", "", False, "clip_sim below the adaptive threshold"),
        pair("coffee", "nowhere", "Add milk foam.", True, None),
    ])


@pytest.fixture(scope="module")
def edit_store(tmp_path_factory: pytest.TempPathFactory, curated: pd.DataFrame, pairs: pd.DataFrame,
               tiny_t2i_dir: Path) -> LocalStore:
    store = LocalStore(tmp_path_factory.mktemp("edit_objects"))
    summary = encode_edit_pairs(pairs, curated, store, PREFIX, LatentEncoders.from_pretrained(None, tiny_t2i_dir, CFG),
                                CFG)
    assert (summary["pairs"], summary["pairs_kept"], summary["encoded"]) == (3, 2, 1), summary
    assert "not an image of the curated dataset" in summary["skipped"][pairs["pair_id"][2]]
    return store


def test_kept_pairs_become_edit_samples(edit_store: LocalStore, pairs: pd.DataFrame, curated: pd.DataFrame) -> None:
    rows, skipped = edit_rows(pairs, curated)
    assert list(rows["media_id"]) == [pairs["pair_id"][0]] and list(skipped) == [pairs["pair_id"][2]]
    assert rows["caption"][0] == "Turn the flag blue." and "astronaut" in rows["t2i_caption"][0]
    index = read_index(edit_store, PREFIX)
    assert index.column("sample_id").to_pylist() == [f"{pairs['pair_id'][0]}-0"]
    with edit_store.open_read(f"{PREFIX}/{index.column('shard')[0].as_py()}") as f:
        (sample,) = list(read_tar(f))
    assert sample.caption == "Turn the flag blue." and sample.meta["t2i_caption"] == rows["t2i_caption"][0]
    assert sample.source_latent.shape == sample.latent.shape and sample.meta["vae"] == "flux"
    assert not np.allclose(sample.source_latent, sample.latent)  # the recoloured region differs
    h, w = (int(v) for v in sample.meta["bucket"].split("x"))
    assert sample.source_image.shape == (h // 2, w // 2, 3)  # what Qwen sees: half the generation size
    with pytest.raises(ValueError, match="lack columns"):
        edit_rows(pairs.drop(columns=["instruction"]), curated)


def test_editing_stage_draws_edit_and_t2i(edit_store: LocalStore, tiny_t2i_dir: Path) -> None:
    from k5data.loading.training_source import ShardLatentSource, TextEncoders

    stage = demo_scaling("image_edit_mr", steps=1)
    assert stage.tasks == {"edit": 0.8, "t2i": 0.2} and stage.model_preset == "tiny_image_edit"
    src = ShardLatentSource(edit_store, PREFIX, stage, TextEncoders.from_pretrained(tiny_t2i_dir), t_max=2)
    assert src.edit_prob == pytest.approx(0.8) and src.modalities == ("image",)
    seen: dict[str, list[torch.Tensor]] = {"edit": [], "t2i": []}
    for _ in range(12):
        b = next(src)
        for x, c, task, e in zip(b.x0, b.condition, b.tasks, b.text_embeds):
            seen[task].append(e)
            if task == "edit":  # the source latent with mask ones
                assert (c[..., 16] == 1).all() and not torch.equal(c[..., :16], x)
            else:
                assert not c.any()
    assert len(seen["edit"]) > len(seen["t2i"]) > 0
    # an edit sample's text holds the instruction and the source's vision tokens; t2i its target's description
    assert seen["edit"][0].shape[0] != seen["t2i"][0].shape[0]
    with pytest.raises(ValueError, match="visual_cond"):
        ShardLatentSource(edit_store, PREFIX, stage, TextEncoders.from_pretrained(tiny_t2i_dir), visual_cond=False)


@pytest.mark.slow  # a `k5 train` subprocess (~30 s on the loaded CI box) + two generations
def test_edit_training_step_and_k5_generate_edit(edit_store: LocalStore, tiny_t2i_dir: Path, curated: pd.DataFrame,
                                                 tmp_path: Path) -> None:
    from k5cli.main import main
    from k5model.pipeline import inspect_model_dir

    out = tmp_path / "edit_mr"
    cmd = [sys.executable, "-m", "k5cli.main", "train", "--stage", "image_edit_mr", "--demo", "--steps", "1",
           "--out", str(out), "--shards", PREFIX, "--store", str(edit_store.root), "--text-encoders",
           str(tiny_t2i_dir), "--base-pipeline", str(tiny_t2i_dir), "--init", str(tiny_t2i_dir / "transformer"),
           "--ckpt-every", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline = out / "pipeline"
    assert inspect_model_dir(pipeline)["task"] == "i2i"  # image VAE + the editing transformer
    assert CrossDiT.from_pretrained(pipeline).config.visual_cond
    source = next(u for u in curated["source_uri"] if Path(u).stem == "astronaut")
    src_png = tmp_path / "source.png"
    shutil.copy(Path(source.removeprefix("file://")), src_png)
    Image.fromarray(255 - np.asarray(Image.open(src_png))).save(tmp_path / "other.png")
    runner = CliRunner()
    args = ["generate", str(pipeline), "--prompt", "Turn the flag blue.", "--height", "64", "--width", "64",
            "--steps", "2", "--no-progress"]
    for name in ("source", "other"):
        result = runner.invoke(main, [*args, "--edit", str(tmp_path / f"{name}.png"), "--out",
                                      str(tmp_path / f"edited_{name}.png")])
        assert result.exit_code == 0, result.output
        assert "wrote" in result.output
    edited = [np.asarray(Image.open(tmp_path / f"edited_{n}.png")) for n in ("source", "other")]
    assert edited[0].shape == (64, 64, 3) and not np.array_equal(*edited)  # the source conditions the edit
    refused = runner.invoke(main, ["generate", str(tiny_t2i_dir), "--prompt", "x", "--edit", str(src_png), "--out",
                                   str(tmp_path / "no.png")])
    assert refused.exit_code != 0 and "--edit needs an instruct-editing" in refused.output
