"""One DRaFT-K step of Image Lite at 1024² with K = 10 (report §6.6; issue 17's GPU acceptance): time and peak memory.

    python -m bench.rl_step                       # image_lite 1024², N = 50, K = 10, 7B-shaped reward model, 1 GPU
    python -m bench.rl_step --offload             # + host offload of the saved step inputs
    python -m bench.rl_step --smoke               # tiny shapes on CPU (runs in tests)

What runs: ``k5model.rl.draft.draft_k_loss`` (the code the ``rl_model`` asset trains with) on a random-weight policy of
the preset (fp32 master weights, bf16 autocast, per-block activation checkpointing from ``k5model.training``), a bf16
frozen anchor copy, a FLUX-layout VAE decoder in the graph and a random Qwen2.5-VL with the 7B's shapes as the reward
(weights are random: no download; time and memory do not depend on the values), then AdamW's step. Text conditions
are random tensors of the encoders' shapes (the text encoders are frozen and run once per prompt, outside the step).
An out-of-memory error is reported with the memory allocated when it happened, as the measured reason it does not fit.
Measured on an H200: docs/rl.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from bench.common import device_info, write_result

QWEN_7B = dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]))


def _reward(smoke: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from k5model.rl.reward import RelativeRewardModel
    from k5model.tiny import QWEN_SPECIALS, _qwen_model, _qwen_tokenizer

    tok = _qwen_tokenizer()
    tok.add_tokens(["Yes", "No"])
    if smoke:
        model = _qwen_model(tok)
    else:
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
        cfg = Qwen2_5_VLConfig(text_config={**QWEN_7B["text"], "rope_parameters": {
            "rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}},
            vision_config=QWEN_7B["vision"], image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    model = model.to(device, dtype).eval().requires_grad_(False)
    if not smoke:
        model.gradient_checkpointing_enable()  # activations of two ~1 Mpx images through 32 + 28 layers
    return RelativeRewardModel(model, tok)


def _vae(smoke: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    from k5model.encoders import ImageVAE

    width = (8, 8, 8, 8) if smoke else (128, 256, 512, 512)  # FLUX.1-dev VAE layout
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=width, layers_per_block=1 if smoke else 2, latent_channels=16,
                        norm_num_groups=4 if smoke else 32, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    if not smoke:
        vae.enable_gradient_checkpointing() if hasattr(vae, "enable_gradient_checkpointing") else None
    return ImageVAE(vae.to(device, dtype))


def run(smoke: bool, offload: bool, size: int, k: int, num_steps: int) -> dict:
    from k5model import CrossDiT, get_preset
    from k5model.flow_matching import TextCondition
    from k5model.rl.draft import DraftConfig, draft_k_loss
    from k5model.synthetic import randomize
    from k5model.training.parallel import apply_activation_checkpointing

    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    act = torch.bfloat16 if cuda else torch.float32
    preset = "tiny_image" if smoke else "image_lite"
    with torch.device(device):
        policy = randomize(CrossDiT(get_preset(preset)), std=0.02).float()
    reference = copy.deepcopy(policy).to_mixed_precision(act).requires_grad_(False) if cuda else \
        copy.deepcopy(policy).requires_grad_(False)
    apply_activation_checkpointing(policy)
    vae, reward = _vae(smoke, device, act), _reward(smoke, device, act)
    cfg = get_preset(preset)
    text = TextCondition(torch.randn(1, 256, cfg.in_text_dim, device=device), torch.ones(1, 256, dtype=torch.bool,
                         device=device), torch.randn(1, cfg.in_text_dim2, device=device))
    null = TextCondition(torch.zeros(1, 8, cfg.in_text_dim, device=device), torch.ones(1, 8, dtype=torch.bool,
                         device=device), torch.zeros(1, cfg.in_text_dim2, device=device))
    noise = torch.randn(1, 1, size // 8, size // 8, 16, device=device)
    real = torch.rand(1, 3, size, size, device=device) * 2 - 1
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=cuda)
    dcfg = DraftConfig(num_steps=num_steps, k=k, guidance_scale=3.5, scale_factor=(1.0, 1.0, 1.0),
                       checkpoint_steps=True, offload_to_cpu=offload)
    res = {"preset": preset, "size": size, "k": k, "num_steps": num_steps, "offload": offload,
           "policy_params_b": sum(p.numel() for p in policy.parameters()) / 1e9, **device_info(cuda)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        with torch.autocast(device.type, dtype=act, enabled=cuda):
            out = draft_k_loss(policy, reference, noise=noise, cond=text, uncond=null, decode=vae.decode_with_grad,
                               reward=reward, real_images=real, prompts=["a photo"], config=dcfg)
        out.loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        res.update(ok=True, step_s=round(time.perf_counter() - t0, 3), loss=out.loss.item(),
                   reward=out.reward.item())
    except torch.OutOfMemoryError as exc:  # the measured reason it does not fit
        res.update(ok=False, reason=f"OOM: {str(exc).splitlines()[0]}",
                   allocated_gib_at_oom=torch.cuda.memory_allocated() / 2**30)
    if cuda:
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--offload", action="store_true", help="host offload of the saved step inputs")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024; smoke 32)")
    ap.add_argument("--k", type=int, default=None, help="grad steps K (default 10; smoke 2)")
    ap.add_argument("--num-steps", type=int, default=None, help="sampler steps N (default 50; smoke 3)")
    a = ap.parse_args()
    res = run(a.smoke, a.offload, a.size or (32 if a.smoke else 1024), a.k or (2 if a.smoke else 10),
              a.num_steps or (3 if a.smoke else 50))
    if not a.smoke:
        write_result("rl_step", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
