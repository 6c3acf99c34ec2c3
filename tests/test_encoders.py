"""Text encoders and VAEs loaded from the tiny pipeline folder through the production ``from_pretrained`` paths."""

from __future__ import annotations

import pytest
import torch

from k5model.encoders import (
    DEFAULT_MAX_LENGTH,
    OFFICIAL_CROP,
    PROMPT_TEMPLATES,
    ClipTextEncoder,
    ImageVAE,
    QwenTextEncoder,
    TextEncoding,
    VideoVAE,
    template_prefix,
)

PROMPTS = ["A cat sits on a red sofa.", "A corgi running on the beach, waves crashing, golden hour lighting."]


@pytest.fixture(scope="module")
def qwen(tiny_t2v_dir) -> QwenTextEncoder:
    return QwenTextEncoder.from_pretrained(tiny_t2v_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def clip(tiny_t2v_dir) -> ClipTextEncoder:
    return ClipTextEncoder.from_pretrained(tiny_t2v_dir, dtype=torch.float32)


# --- templates ---------------------------------------------------------------------------------------------------


def test_templates_keep_official_wording():
    for task, template in PROMPT_TEMPLATES.items():
        assert template.startswith("<|im_start|>system\nYou are a promt engineer."), task  # trained typo kept
        assert template.count("{}") == 1
    assert "Describe the video in detail." in PROMPT_TEMPLATES["video"]
    assert "based on a provided input image" in PROMPT_TEMPLATES["i2v"]
    assert "Describe the image by detailing the color" in PROMPT_TEMPLATES["image"]
    for task in ("video", "i2v", "image"):
        assert PROMPT_TEMPLATES[task].endswith("<|im_end|>\n<|im_start|>user\n{}<|im_end|>")
    assert PROMPT_TEMPLATES["edit"].endswith("<|im_start|>user\n{}")
    assert template_prefix("image").endswith("<|im_start|>user\n")


# --- Qwen --------------------------------------------------------------------------------------------------------


def test_qwen_loads_from_pipeline_and_component_folders(tiny_t2v_dir, qwen):
    assert qwen.hidden_size == 32
    direct = QwenTextEncoder.from_pretrained(
        tiny_t2v_dir / "text_encoder", tokenizer_path=tiny_t2v_dir / "tokenizer", dtype=torch.float32
    )
    sub = QwenTextEncoder.from_pretrained(tiny_t2v_dir, subfolder="text_encoder", dtype=torch.float32)
    a, b, c = (e.encode(PROMPTS[:1]) for e in (qwen, direct, sub))
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.embeds, c.embeds)


def test_crop_is_template_prefix_token_count(qwen):
    # The tiny tokenizer splits template words like the real Qwen2.5 one, so the computed crops are the official ones.
    for task in ("video", "image", "i2v"):
        assert qwen.prefix_length(task) == OFFICIAL_CROP[task]
    # Editing: the prefix is 52 tokens (real tokenizer too); the official code crops 55 (see module docstring).
    assert qwen.prefix_length("edit") == 52
    for task in PROMPT_TEMPLATES:
        ids = qwen.tokenizer(template_prefix(task), add_special_tokens=False)["input_ids"]
        assert qwen.prefix_length(task) == len(ids)


def test_encode_drops_exactly_the_prefix_hidden_states(qwen):
    prompt = PROMPTS[0]
    enc = qwen.encode([prompt], task="video")
    ids = qwen.tokenizer(PROMPT_TEMPLATES["video"].format(prompt), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = qwen.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    crop = OFFICIAL_CROP["video"]
    n = len(ids) - crop  # prompt tokens + the closing <|im_end|>
    assert int(enc.lengths[0]) == n
    torch.testing.assert_close(enc.embeds[0, :n], full[0, crop:], rtol=1e-5, atol=1e-5)


def test_mask_padding_and_shapes(qwen):
    enc = qwen.encode(PROMPTS, task="video")
    assert isinstance(enc, TextEncoding) and len(enc) == 2
    assert enc.embeds.shape == (2, DEFAULT_MAX_LENGTH["video"], 32)
    assert enc.mask.shape == (2, 256) and enc.mask.dtype == torch.bool
    for i, p in enumerate(PROMPTS):
        n_prompt = len(qwen.tokenizer(p, add_special_tokens=False)["input_ids"])
        n = int(enc.lengths[i])
        assert n == n_prompt + 1  # + <|im_end|>
        assert enc.mask[i, :n].all() and not enc.mask[i, n:].any()  # real tokens first, then padding
        assert (enc.embeds[i, n:] == 0).all() and enc.embeds[i, :n].abs().sum() > 0
    assert enc.lengths[0] < enc.lengths[1]
    assert enc.cu_seqlens.tolist() == [0, int(enc.lengths[0]), int(enc.lengths.sum())]
    image = qwen.encode(PROMPTS[:1], task="image")
    assert image.embeds.shape == (1, 512, 32)


def test_batch_composition_does_not_change_a_row(qwen):
    alone = qwen.encode(PROMPTS[:1])
    batched = qwen.encode(PROMPTS)
    torch.testing.assert_close(batched.embeds[0], alone.embeds[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.mask[0], alone.mask[0])


def test_long_prompt_truncates_to_max_length(qwen):
    long_prompt = " ".join(["a red cat on a sofa"] * 40)
    short = qwen.encode([long_prompt], max_length=8)
    assert short.embeds.shape == (1, 8, 32) and short.mask.all() and int(short.lengths[0]) == 8
    full = qwen.encode([long_prompt], max_length=300)
    assert int(full.lengths[0]) > 8
    # Causal model: the kept tokens see the same context whether or not the tail was cut.
    torch.testing.assert_close(short.embeds[0], full.embeds[0, :8], rtol=1e-5, atol=1e-5)


def test_crop_override(qwen):
    default = qwen.encode(PROMPTS[:1], task="image")
    earlier = qwen.encode(PROMPTS[:1], task="image", crop_start=OFFICIAL_CROP["image"] - 1)
    assert int(earlier.lengths[0]) == int(default.lengths[0]) + 1
    n = int(default.lengths[0])
    torch.testing.assert_close(earlier.embeds[0, 1 : 1 + n], default.embeds[0, :n])


@pytest.mark.parametrize(
    ("prompts", "match"),
    [([], "empty"), ("a cat", "single str"), (["ok", 3], "entries \\[1\\]"), (None, "list of strings")],
)
def test_bad_prompts_raise(qwen, clip, prompts, match):
    with pytest.raises(ValueError, match=match):
        qwen.encode(prompts)
    with pytest.raises(ValueError, match=match):
        clip.encode(prompts)


def test_unknown_task_raises(qwen):
    with pytest.raises(ValueError, match="unknown task"):
        qwen.encode(["x"], task="audio")


def test_text_encoding_to_keeps_mask_bool(qwen):
    enc = qwen.encode(PROMPTS[:1]).to("cpu", torch.bfloat16)
    assert enc.embeds.dtype == torch.bfloat16 and enc.mask.dtype == torch.bool and enc.lengths.dtype == torch.int64


# --- CLIP --------------------------------------------------------------------------------------------------------


def test_clip_pooled(clip, tiny_t2v_dir):
    pooled = clip.encode(PROMPTS)
    assert pooled.shape == (2, 32) and torch.isfinite(pooled).all()
    assert not torch.allclose(pooled[0], pooled[1])
    sub = ClipTextEncoder.from_pretrained(tiny_t2v_dir / "text_encoder_2", tokenizer_path=tiny_t2v_dir / "tokenizer_2",
                                          dtype=torch.float32)
    torch.testing.assert_close(sub.encode(PROMPTS), pooled)
    ids = clip.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert all(len(r) == 77 for r in ids)
    # A prompt longer than 77 tokens is truncated, not an error.
    assert clip.encode([" ".join(["cat"] * 200)]).shape == (1, 32)


def test_matches_diffusers_encoding_up_to_the_typo_fix(tiny_t2v_dir, qwen, clip):
    """diffusers crops one token less (it spells "prompt"); on the same tokens the states agree."""
    from diffusers import Kandinsky5T2VPipeline

    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny_t2v_dir, dtype=torch.float32)
    pipe.prompt_template = PROMPT_TEMPLATES["video"]  # same text, diffusers' fixed crop of 128
    theirs, _ = pipe._encode_prompt_qwen(PROMPTS[:1], device=torch.device("cpu"))
    ours = qwen.encode(PROMPTS[:1])
    n = int(ours.lengths[0])
    assert theirs.shape[1] == n + 1  # their first token is the last template token "\n"
    torch.testing.assert_close(theirs[0, 1:], ours.embeds[0, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe._encode_prompt_clip(PROMPTS, device=torch.device("cpu")), clip.encode(PROMPTS))


# --- VAEs --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_vae(tiny_t2v_dir) -> VideoVAE:
    return VideoVAE.from_pretrained(tiny_t2v_dir)


def _pixels(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_video_vae_shapes_scaling_and_determinism(video_vae):
    assert (video_vae.temporal_compression, video_vae.spatial_compression, video_vae.latent_channels) == (4, 8, 16)
    assert video_vae.scaling_factor == pytest.approx(0.476986)
    x = _pixels(1, 3, 17, 64, 64)
    z = video_vae.encode(x)
    assert z.shape == (1, 5, 8, 8, 16)
    assert torch.equal(z, video_vae.encode(x))  # mean of the posterior: deterministic
    raw = video_vae.vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, raw.permute(0, 2, 3, 4, 1) * video_vae.scaling_factor)
    y = video_vae.decode(z)
    assert y.shape == (1, 3, 17, 64, 64) and y.min() >= -1 and y.max() <= 1
    assert torch.equal(y, video_vae.decode(z))
    torch.testing.assert_close(y, video_vae.vae.decode(raw).sample.clamp(-1, 1))


def test_video_vae_image_input_sampling_and_errors(video_vae):
    img = _pixels(2, 3, 32, 48)
    z = video_vae.encode(img)
    assert z.shape == (2, 1, 4, 6, 16)
    assert video_vae.decode(z).shape == (2, 3, 1, 32, 48)
    s1 = video_vae.encode(img, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = video_vae.encode(img, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, z)
    with pytest.raises(ValueError, match="4k\\+1"):
        video_vae.encode(_pixels(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        video_vae.encode(_pixels(1, 3, 1, 30, 32))


def test_image_vae_scaling_only_no_shift(tiny_t2i_dir):
    vae = ImageVAE.from_pretrained(tiny_t2i_dir)
    assert vae.vae.config.shift_factor == pytest.approx(0.1159)  # present in the config, deliberately unused
    assert (vae.spatial_compression, vae.temporal_compression, vae.latent_channels) == (8, 1, 16)
    x = _pixels(2, 3, 64, 64)
    z = vae.encode(x)
    assert z.shape == (2, 1, 8, 8, 16)
    raw = vae.vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z[:, 0], raw.permute(0, 2, 3, 1) * 0.3611)
    y = vae.decode(z)
    assert y.shape == (2, 3, 64, 64) and y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(vae.decode(z[:, 0]), y)
    torch.testing.assert_close(y, vae.vae.decode(raw).sample.clamp(-1, 1))
