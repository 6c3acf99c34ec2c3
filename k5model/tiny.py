"""A tiny random Kandinsky 5 pipeline folder, laid out exactly like the diffusers ones, for CPU tests and demos.

Every component is a real class at toy size (built locally: no download), so the folder loads through the same
``from_pretrained`` paths as production weights, in diffusers' Kandinsky5 pipelines and in ours.

Deviation from real diffusers repos: ``tokenizer/`` is a plain ``Qwen2Tokenizer`` rather than a ``Qwen2VLProcessor``
(the processor's video part needs torchvision, which the project does not install). The diffusers pipelines only call
it on text, which a tokenizer accepts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

from k5model.config import get_preset
from k5model.encoders.text import PROMPT_TEMPLATES

KINDS = ("t2v", "i2v", "t2i", "i2i")  # i2i: instruct editing (image VAE, visual_cond transformer)
PIPELINE_CLASS = {"t2v": "Kandinsky5T2VPipeline", "i2v": "Kandinsky5I2VPipeline", "t2i": "Kandinsky5T2IPipeline",
                  "i2i": "Kandinsky5I2IPipeline"}
IMAGE_KINDS = ("t2i", "i2i")
COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
MARKER = ".k5_tiny.json"  # records kind + seed so a re-run can tell its own complete folder
TEXT_DIM = 32  # Qwen hidden size == CLIP hidden size == tiny preset in_text_dim / in_text_dim2

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Same split rule as the real Qwen2 tokenizer, so template/prompt boundaries tokenise the same way.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

_CORPUS = [t.replace("{}", " ") for t in PROMPT_TEMPLATES.values()] + [
    "A cat sits on a red sofa in a sunny living room.",
    "A drone shot of a mountain lake at sunrise, mist over the water, camera slowly moving forward.",
    "Close-up of a chef slicing vegetables on a wooden board, shallow depth of field.",
    "A corgi running on the beach, waves crashing, golden hour lighting, slow motion.",
    "Neon city street at night in the rain, people with umbrellas walking past shop windows.",
    "An astronaut riding a horse on the moon, photorealistic, 4k, cinematic.",
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards",
    "Кот сидит на красном диване. Собака бежит по пляжу.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
]


# Where the real Qwen2.5 vocabulary splits a template word in two (checked against its BPE ranks). Training the tiny
# BPE on these pieces makes the tiny tokenizer cut the templates into exactly as many tokens as the real one, so the
# computed crop equals the official 129 (video) / 41 (image) / 132 (i2v) and diffusers' fixed crops stay valid.
QWEN_SPLITS = {" promt": (" prom", "t"), " dynamism": (" dynam", "ism"), " scren": (" scre", "n"),
               " postprocessing": (" post", "processing")}


def _learn_merges(words: dict[tuple[str, ...], int], max_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair), so every run is identical.

    (The ``tokenizers`` trainer breaks ties by hash order, which changes between processes.)
    """
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda pr: (-pairs[pr], pr))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


def _train_bpe(max_merges: int, specials: list[str], *, clip: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE (vocab, merges) learned from the built-in corpus."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    counts: Counter[tuple[str, ...]] = Counter()
    if clip:
        # CLIPTokenizer's own normaliser and split rule; "</w>" marks a word end.
        norm = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        split = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)
        for text in _CORPUS:
            for word, _ in split.pre_tokenize_str(norm.normalize_str(text)):
                chars = list(to_bytes.pre_tokenize_str(word)[0][0])
                counts[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    else:
        # Qwen pre-tokens with QWEN_SPLITS applied; special tokens are added tokens, never BPE words.
        split = pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated")
        specials_split = pre_tokenizers.Split(Regex("|".join(re.escape(t) for t in specials)), behavior="removed")
        for text in _CORPUS:
            for piece, _ in specials_split.pre_tokenize_str(text):
                for word, _ in split.pre_tokenize_str(piece):
                    for part in QWEN_SPLITS.get(word, (word,)):
                        counts[tuple(to_bytes.pre_tokenize_str(part)[0][0])] += 1
    merges = _learn_merges(dict(counts), max_merges)
    vocab: dict[str, int] = {}
    base = alphabet + [ch + "</w>" for ch in alphabet] if clip else alphabet
    for piece in [*specials, *base, *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    return vocab, merges


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(4000, QWEN_SPECIALS, clip=False)  # to completion: corpus words -> 1 token
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=QWEN_SPECIALS[1:])


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _train_bpe(400, ["<|startoftext|>", "<|endoftext|>"], clip=True)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _qwen_model(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            # head_dim 16 -> 8 rotary pairs split over (t, h, w) like the real [16, 24, 24] for head_dim 128.
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_DIM,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _clip_model(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _vae(kind: str):
    if kind in IMAGE_KINDS:
        from diffusers import AutoencoderKL

        # FLUX.1-dev VAE layout (16 channels, 8x, no quant convs) at toy width; its real scaling/shift values.
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4,
            sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=True,
        )
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )


def _transformer(kind: str):
    from k5model.crossdit import CrossDiT

    model = CrossDiT(get_preset("tiny", visual_cond=kind != "t2i"))
    # Modulations are zero-initialised (every block starts as identity, text ignored). Give them small random
    # values so the tiny model's output depends on timestep, text and pooled text - tests of CFG/conditioning need it.
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, 0.02)
    return model


def _scheduler(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if kind in IMAGE_KINDS else 10.0)


def _model_index(kind: str) -> dict:
    import diffusers

    return {
        "_class_name": PIPELINE_CLASS[kind],
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "Kandinsky5Transformer3DModel"],
        "vae": ["diffusers", "AutoencoderKL" if kind in IMAGE_KINDS else "AutoencoderKLHunyuanVideo"],
    }


def is_complete(path: str | os.PathLike, kind: str | None = None, seed: int | None = None) -> bool:
    """True if ``path`` is a finished tiny pipeline folder (of ``kind``/``seed`` when given)."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    if kind is not None and marker.get("kind") != kind:
        return False
    if seed is not None and marker.get("seed") != seed:
        return False
    return all((path / c).is_dir() for c in COMPONENTS if c in index)


def _write(root: Path, kind: str, seed: int) -> None:
    torch.manual_seed(seed)  # one seed, fixed build order -> identical weights on every run
    qtok = _qwen_tokenizer()
    qtok.save_pretrained(root / "tokenizer")
    _qwen_model(qtok).save_pretrained(root / "text_encoder")
    ctok = _clip_tokenizer()
    ctok.save_pretrained(root / "tokenizer_2")
    _clip_model(ctok).save_pretrained(root / "text_encoder_2")
    _vae(kind).save_pretrained(root / "vae")
    _transformer(kind).save_pretrained(root / "transformer")
    _scheduler(kind).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(_model_index(kind), indent=2, sort_keys=True) + "\n")
    (root / MARKER).write_text(json.dumps({"kind": kind, "seed": seed}) + "\n")


def build_tiny_pipeline(out_dir: str | os.PathLike, kind: str = "t2v", seed: int = 0) -> Path:
    """Write a tiny random diffusers Kandinsky 5 pipeline folder of ``kind`` (``KINDS``) to ``out_dir``.

    Built in a temporary sibling folder and renamed into place, so ``out_dir`` is either absent or complete; calling
    again on a complete folder of the same kind and seed is a no-op. Returns ``out_dir``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out_dir)
    if is_complete(out, kind, seed):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Never delete something we did not write.
        raise FileExistsError(f"{out} exists and is not a tiny {kind} pipeline (seed {seed}); remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should look like any other
    try:
        _write(tmp, kind, seed)
        if out.exists():
            out.rmdir()  # empty folder (checked above)
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first; accept its folder if it is the same build.
            if not is_complete(out, kind, seed):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
