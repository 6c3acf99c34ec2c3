"""Prompt → video, end to end: our K5Pipeline vs diffusers' Kandinsky5T2VPipeline at its best, same weights.

Both pipelines get the same full-size components with random weights (timing only): Qwen2.5-VL-7B and CLIP ViT-L/14
text encoders (shared objects; tokenizers: the tiny pipeline's BPE, whose ids fit the real vocabularies), video_lite
(2B) in bf16 with fp32 time/modulation, and the HunyuanVideo VAE in fp16 (one instance each, same init). Each phase
is timed with the device synchronised at its end: text encoding (prompt and negative prompt), the denoising loop
(``--steps`` steps with CFG = 2 × steps NFE), VAE decode (pixels to host, uint8 for ours, numpy for diffusers).

Ours: ``K5Pipeline.generate`` with ``compile_blocks()`` (CFG batched into one forward of batch 2) and the chunked
causal decoder (``VideoVAE.use_chunked_decoding``). Anchor: diffusers' pipeline with its transformer on the
``_native_cudnn`` attention backend and ``compile_repeated_blocks``, its VAE at ``--diffusers-vae`` (a
``bench.vae_decode`` setting; choose the fastest within 40 GB that bench measured). A warm-up generation of one
step precedes each timed one (compilation, cuDNN autotuning). The official figures (README of kandinskylab/
kandinsky-5: 139 s for 5 s and 224 s for 10 s video_lite on one H100 with FlashAttention 3, whole generation) are
a reference row, not a same-run anchor.

    python -m bench.e2e_generation --steps 50                 # GPU: 5 s, 512x768, 100 NFE
    python -m bench.e2e_generation --steps 50 --seconds 10 --nabla --force-total-density 0.1 --no-diffusers
    python -m bench.e2e_generation --smoke                    # CPU: tiny preset and components, 2 steps
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import device_info, diffusers_twin, sync, video_setup, write_result
from bench.vae_decode import configure_diffusers
from bench.vae_encode import build_vae
from k5model import CrossDiT
from k5model.config import NABLA_10S
from k5model.encoders import ClipTextEncoder, QwenTextEncoder, VideoVAE
from k5model.pipeline import DEFAULT_VIDEO_NEGATIVE, K5Pipeline
from k5model.runtime_options import NablaOptions
from k5model.synthetic import randomize

OFFICIAL_H100_FA3_S = {5: 139.0, 10: 224.0}  # kandinsky-5 README, video_lite, whole generation
PROMPT = "A corgi running on the beach, waves crashing, golden hour lighting, slow motion."


def text_encoders(smoke: bool, device: torch.device, dtype: torch.dtype):
    """(Qwen model, its tokenizer, CLIP text model, its tokenizer): full size with random weights on the GPU, the
    tiny pipeline's models on CPU."""
    from k5model.tiny import QWEN_SPECIALS, _clip_model, _clip_tokenizer, _qwen_model, _qwen_tokenizer

    qtok, ctok = _qwen_tokenizer(), _clip_tokenizer()
    if smoke:
        return _qwen_model(qtok), qtok, _clip_model(ctok), ctok
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: qtok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    qcfg = Qwen2_5_VLConfig(  # Qwen2.5-VL-7B-Instruct's shapes
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1000000.0},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    ccfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                          bos_token_id=ctok.bos_token_id, eos_token_id=ctok.eos_token_id,
                          pad_token_id=ctok.pad_token_id)
    with torch.device(device):
        qwen = Qwen2_5_VLForConditionalGeneration._from_config(qcfg, dtype=dtype).eval()
        clip = CLIPTextModel._from_config(ccfg, dtype=dtype).eval()
    return qwen, qtok, clip, ctok


class PhaseTimer:
    """Wraps a bound method so each call's seconds (device synchronised at both ends) add up under ``name``."""

    def __init__(self, times: dict[str, float], name: str, fn):
        self.times, self.name, self.fn = times, name, fn

    def __call__(self, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        sync()
        self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - t0
        return out


def run_diffusers(args, cfg, ours_model, qwen, qtok, clip, ctok, shape, device, dtype, cuda: bool) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline

    frames, height, width = shape
    twin = diffusers_twin(cfg, ours_model, device, dtype)
    backend = "_native_cudnn" if cuda else "native"
    twin.set_attention_backend(backend)
    if not args.no_compile:
        twin.compile_repeated_blocks(fullgraph=False)
    vae = build_vae(not cuda).to(device, torch.float16 if cuda else torch.float32).eval()
    configure_diffusers(vae, args.diffusers_vae)
    pipe = Kandinsky5T2VPipeline(transformer=twin, vae=vae, text_encoder=qwen, tokenizer=qtok, text_encoder_2=clip,
                                 tokenizer_2=ctok, scheduler=FlowMatchEulerDiscreteScheduler(shift=10.0))
    pipe.set_progress_bar_config(disable=True)
    times: dict[str, float] = {}
    pipe.encode_prompt = PhaseTimer(times, "encode_s", pipe.encode_prompt)
    vae.decode = PhaseTimer(times, "vae_decode_s", vae.decode)
    kw = dict(prompt=PROMPT, negative_prompt=DEFAULT_VIDEO_NEGATIVE, height=height, width=width, num_frames=frames,
              guidance_scale=5.0, output_type="np")
    with torch.no_grad():
        pipe(**kw, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
        times.clear()
        sync()
        t0 = time.perf_counter()
        pipe(**kw, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
        sync()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    # the pipeline's decode phase starts at vae.decode and ends with its postprocessing; denoising is the rest
    return {"backend": backend, "vae_setting": args.diffusers_vae, "total_s": total, "encode_s": times["encode_s"],
            "vae_decode_s": times["vae_decode_s"],
            "denoise_and_postprocess_s": total - times["encode_s"] - times["vae_decode_s"], "peak_gb": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--nabla", action="store_true", help="ours with NABLA (the 10 s models' attention)")
    ap.add_argument("--force-total-density", type=float, default=None,
                    help="NABLA: pin the block density (STA included), for random weights")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--decode-chunk", type=int, default=4, help="our decoder's latent frames per chunk")
    ap.add_argument("--diffusers-vae", default="default", help="the anchor's VAE decode setting (bench.vae_decode)")
    args = ap.parse_args()
    cuda, device, dtype, cfg, (t, h, w, _) = video_setup(args.smoke, args.seconds)
    if args.nabla:
        cfg = cfg.replace(**NABLA_10S)
    if not cuda:
        args.steps = 2
    frames, height, width = (t - 1) * 4 + 1, h * 8, w * 8
    res: dict = {**device_info(cuda), "steps": args.steps, "nfe": 2 * args.steps, "frames": frames,
                 "size": [height, width], "official_h100_fa3_s": OFFICIAL_H100_FA3_S.get(args.seconds)}
    qwen, qtok, clip, ctok = text_encoders(not cuda, device, dtype)
    model = randomize(CrossDiT(cfg), seed=0).to(device)
    if dtype != torch.float32:
        model.to_mixed_precision(dtype)
    forced = args.force_total_density
    model.set_options(nabla=NablaOptions(force_density=forced, force_total=forced is not None))
    res["attention"], res["force_total_density"] = cfg.attention_type, forced
    if not args.no_compile:
        model.compile_blocks()
    vae = VideoVAE(build_vae(not cuda).to(device, torch.float16 if cuda else torch.float32))
    vae.use_chunked_decoding(args.decode_chunk)
    pipe = K5Pipeline(model, QwenTextEncoder(qwen, qtok, device=device), ClipTextEncoder(clip, ctok, device=device),
                      vae, task="t2v", device=device)
    kw = dict(negative_prompt=DEFAULT_VIDEO_NEGATIVE, height=height, width=width, num_frames=frames, progress=False)
    pipe.generate(PROMPT, num_steps=1, **kw)  # warm-up: compilation, cuDNN autotuning
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = pipe.generate(PROMPT, num_steps=args.steps, **kw)
    res["ours"] = {**out.timings, "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
                   "decode_chunk_latent_frames": args.decode_chunk}
    print(json.dumps(res), flush=True)  # partial result first: the anchor's run is the long one
    if not args.no_diffusers:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res["diffusers"] = d = run_diffusers(args, cfg, model, qwen, qtok, clip, ctok, (frames, height, width),
                                             device, dtype, cuda)
        ours = res["ours"]
        res["speedup_total"] = d["total_s"] / ours["total_s"]
        res["speedup_vae_decode"] = d["vae_decode_s"] / ours["decode_s"]
        res["speedup_denoise"] = d["denoise_and_postprocess_s"] / ours["sample_s"]
    if res["official_h100_fa3_s"]:
        res["ours_vs_official"] = res["official_h100_fa3_s"] / res["ours"]["total_s"]
    write_result(f"e2e_generation_{args.seconds}s{'_nabla' if args.nabla else ''}.json", res)


if __name__ == "__main__":
    main()
