"""CrossDiT against diffusers 0.42.1 (weights both ways, outputs), official single files, packing, masks."""

from __future__ import annotations

import functools
import json

import helpers
import pytest
import torch
from diffusers import Kandinsky5Transformer3DModel

from k5model import CrossDiT, get_preset
from k5model.checkpoint import CheckpointError, checkpoint_dtypes, save_single_file
from k5model.runtime_options import AttentionOptions

# Tolerances. With ``AttentionOptions(rope_cast=bf16)`` our model performs the same rounding as diffusers (which casts
# the rotated q/k to bf16 even in fp32), so fp32 outputs must agree to float round-off. With the official fp32 RoPE the
# only difference is that rounding: |Δq|/|q| <= 2^-8 per element, which through the tiny random network (weights
# N(0, 0.2), outputs of magnitude ~5) moves outputs by ~1e-4 absolute; we allow 2e-3 relative to the output scale.
EXACT_ATOL = 1e-5
ROPE_REL_TOL = 2e-3


# Random weights everywhere, modulation included (zero-init gates would hide most of the network), with a larger
# spread than the library default so that every path moves the output.
randomize = functools.partial(helpers.randomize, std=0.2)
inputs = helpers.small_forward_inputs


def assert_packed_equals_alone(model, packed, lats, texts, t, pooled):
    """Each packed output must equal a forward of that sample alone (its own shape, text, time, RoPE)."""
    for i, (lat, txt) in enumerate(zip(lats, texts)):
        alone = model(lat[None], txt[None], t[i : i + 1], pooled[i : i + 1],
                      [torch.arange(lat.shape[0]), torch.arange(lat.shape[1] // 2), torch.arange(lat.shape[2] // 2)],
                      torch.arange(txt.shape[0]), scale_factor=(1.0, 2.0, 2.0)).sample[0]
        assert packed[i].shape == alone.shape
        torch.testing.assert_close(packed[i], alone, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(**cfg.to_dict())
    randomize(model)
    path = tmp_path_factory.mktemp("diffusers_transformer")
    model.save_pretrained(path)
    return path


def test_presets_match_nominal_sizes():
    from k5model.config import NOMINAL_PARAMS

    for name, nominal in NOMINAL_PARAMS.items():
        with torch.device("meta"):
            n = CrossDiT(get_preset(name)).num_parameters()
        assert abs(n / nominal - 1) < 0.02, (name, n)


def test_diffusers_to_ours_outputs_match(diffusers_dir):
    ref_model = Kandinsky5Transformer3DModel.from_pretrained(diffusers_dir).eval()
    ours = CrossDiT.from_pretrained(diffusers_dir).eval()
    kw = inputs(ours.config)
    with torch.no_grad():
        ref = ref_model(**kw).sample
        with ours.options_applied(attention=AttentionOptions(rope_cast=torch.bfloat16)):
            emulated = ours(**kw).sample
        official = ours(**kw).sample  # the default: rotated q/k kept in fp32
    assert ref.shape == (2, 3, 8, 12, 16)
    torch.testing.assert_close(emulated, ref, atol=EXACT_ATOL, rtol=0)
    scale = ref.abs().max()
    assert (official - ref).abs().max() / scale < ROPE_REL_TOL
    # and the fp32 path really is different from the bf16-rounded one (the flag does something)
    assert not torch.equal(official, emulated)


def test_ours_to_diffusers_no_missing_keys(tmp_path, diffusers_dir):
    ours = CrossDiT.from_pretrained(diffusers_dir)
    ours.save_pretrained(tmp_path / "transformer")
    cfg = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "Kandinsky5Transformer3DModel"
    back, info = Kandinsky5Transformer3DModel.from_pretrained(tmp_path / "transformer", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    kw = inputs(ours.config)
    ours.set_options(attention=AttentionOptions(rope_cast=torch.bfloat16))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**kw).sample, back.eval()(**kw).sample, atol=EXACT_ATOL, rtol=0)


def test_sharded_save_roundtrip(tmp_path):
    model = CrossDiT(get_preset("tiny"))
    randomize(model, seed=3)
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    back = CrossDiT.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # diffusers reads our shards too
    Kandinsky5Transformer3DModel.from_pretrained(tmp_path)


def test_official_single_file(tmp_path, diffusers_dir):
    ours = CrossDiT.from_pretrained(diffusers_dir)
    path = save_single_file(ours, tmp_path / "kandinsky5lite_t2v_tiny.safetensors")
    dtypes = checkpoint_dtypes(path)
    assert dtypes["visual_transformer_blocks.0.visual_modulation.out_layer.weight"] == "F32"
    assert dtypes["visual_transformer_blocks.0.feed_forward.in_layer.weight"] == "BF16"
    # config inferred from shapes (axes_dims given: the tiny head dim has no official split)
    loaded = CrossDiT.from_pretrained(path, axes_dims=(4, 6, 6))
    assert loaded.config.to_dict() == ours.config.to_dict()
    # or from a preset name
    loaded2 = CrossDiT.from_pretrained(path, config="tiny", torch_dtype=torch.float32)
    kw = inputs(ours.config)
    ref_model = Kandinsky5Transformer3DModel.from_pretrained(diffusers_dir).eval()
    ref_model.load_state_dict({k: v.float() for k, v in loaded2.state_dict().items()})
    loaded2.set_options(attention=AttentionOptions(rope_cast=torch.bfloat16))
    with torch.no_grad():
        torch.testing.assert_close(loaded2.eval()(**kw).sample, ref_model(**kw).sample, atol=EXACT_ATOL, rtol=0)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, diffusers_dir):
    with pytest.raises(CheckpointError, match="does not match"):
        CrossDiT.from_pretrained(diffusers_dir, num_visual_blocks=3)
    with pytest.raises(CheckpointError, match="does not exist"):
        CrossDiT.from_pretrained(tmp_path / "nope")


def test_text_mask_equals_unpadded_text():
    model = CrossDiT(get_preset("tiny")).eval()
    randomize(model, seed=5)
    kw = inputs(model.config, batch=1, text_len=5)
    padded = dict(kw)
    padded["encoder_hidden_states"] = torch.cat([kw["encoder_hidden_states"], torch.randn(1, 4, 32) * 10], dim=1)
    padded["text_rope_pos"] = torch.arange(9)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    with torch.no_grad():
        ref = model(**kw).sample
        masked = model(**padded, encoder_attention_mask=mask).sample
        unmasked = model(**padded).sample
    torch.testing.assert_close(masked, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, ref, atol=1e-3)


def test_packed_batch_equals_samples_alone():
    model = CrossDiT(get_preset("tiny")).eval()
    randomize(model, seed=7)
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 8, 12), (1, 16, 8), (2, 4, 4)]
    lats = [torch.randn(*s, 33, generator=gen) for s in shapes]
    texts = [torch.randn(n, 32, generator=gen) for n in (5, 9, 3)]
    t = torch.tensor([100.0, 500.0, 950.0])
    pooled = torch.randn(3, 32, generator=gen)
    with torch.no_grad():
        packed = model.forward_packed(lats, texts, t, pooled, scale_factor=(1.0, 2.0, 2.0))
        assert_packed_equals_alone(model, packed, lats, texts, t, pooled)


def test_single_document_pack_needs_no_mask():
    from k5model.crossdit import _packed_mask

    # one document: SDPA runs unmasked (fused kernels); several: the block-diagonal mask
    assert _packed_mask([12], [5], "cpu") is None
    mask = _packed_mask([2, 3], [1, 2], "cpu")
    assert mask.shape == (5, 3) and mask[:2, :1].all() and not mask[:2, 1:].any() and mask[2:, 1:].all()
    model = CrossDiT(get_preset("tiny")).eval()
    randomize(model, seed=3)
    gen = torch.Generator().manual_seed(1)
    lats, texts = [torch.randn(3, 8, 12, 33, generator=gen)], [torch.randn(6, 32, generator=gen)]
    t, pooled = torch.tensor([400.0]), torch.randn(1, 32, generator=gen)
    with torch.no_grad():
        packed = model.forward_packed(lats, texts, t, pooled, scale_factor=(1.0, 2.0, 2.0))
        assert_packed_equals_alone(model, packed, lats, texts, t, pooled)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = CrossDiT(get_preset("tiny"))
    randomize(model, seed=9, std=0.1)
    kw = inputs(model.config)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(ckpt)
        model(**kw).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_mixed_precision_keeps_modulation_fp32():
    model = CrossDiT(get_preset("tiny")).to_mixed_precision(torch.bfloat16)
    assert model.time_embeddings.in_layer.weight.dtype == torch.float32
    assert model.visual_transformer_blocks[0].visual_modulation.out_layer.weight.dtype == torch.float32
    assert model.visual_transformer_blocks[0].self_attention.to_query.weight.dtype == torch.bfloat16
    kw = inputs(model.config)
    kw = {k: (v.bfloat16() if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v)
          for k, v in kw.items()}
    out = model(**kw).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bad_input_shapes_are_named():
    model = CrossDiT(get_preset("tiny"))
    kw = inputs(model.config)
    kw["hidden_states"] = kw["hidden_states"][..., :16]
    with pytest.raises(ValueError, match="16 channels"):
        model(**kw)


def nabla_cfg(**kw):
    base = dict(attention_type="nabla", attention_P=0.9, attention_wT=11, attention_wH=3, attention_wW=3,
                attention_add_sta=True, attention_method="topcdf")
    base.update(kw)
    return get_preset("tiny", **base)


def test_nabla_full_mask_equals_dense_model():
    dense = CrossDiT(get_preset("tiny")).eval()
    randomize(dense, seed=11)
    # P = 1 keeps every block; the mask is then all-True and NABLA must reproduce dense attention exactly.
    sparse = CrossDiT(nabla_cfg(attention_P=1.0)).eval()
    sparse.load_state_dict(dense.state_dict())
    kw = inputs(dense.config, batch=1, frames=2, height=32, width=32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(**kw).sample, dense(**kw).sample, atol=1e-5, rtol=1e-5)


def test_nabla_is_sparse_and_trains_on_cpu():
    model = CrossDiT(nabla_cfg(attention_P=0.3, attention_wT=1, attention_wH=1, attention_wW=1))
    randomize(model, seed=12, std=0.3)
    kw = inputs(model.config, batch=1, frames=2, height=32, width=32)
    dense = CrossDiT(get_preset("tiny"))
    dense.load_state_dict(model.state_dict())
    out = model(**kw).sample
    with torch.no_grad():
        assert not torch.allclose(out, dense(**kw).sample, atol=1e-4)  # the mask really drops blocks
    out.square().mean().backward()  # masked-SDPA path: autograd works on CPU
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_nabla_packed_equals_samples_alone():
    model = CrossDiT(nabla_cfg(attention_P=0.5, attention_wT=3)).eval()
    randomize(model, seed=13)
    gen = torch.Generator().manual_seed(2)
    shapes = [(2, 16, 32), (1, 32, 16)]
    lats = [torch.randn(*s, 33, generator=gen) for s in shapes]
    texts = [torch.randn(n, 32, generator=gen) for n in (4, 6)]
    t = torch.tensor([200.0, 800.0])
    pooled = torch.randn(2, 32, generator=gen)
    with torch.no_grad():
        packed = model.forward_packed(lats, texts, t, pooled, scale_factor=(1.0, 2.0, 2.0))
        assert_packed_equals_alone(model, packed, lats, texts, t, pooled)


def test_nabla_rejects_grid_not_multiple_of_tile():
    model = CrossDiT(nabla_cfg())
    kw = inputs(model.config, batch=1, frames=1, height=8, width=12)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(**kw)


def test_nabla_matches_diffusers_nabla():
    """diffusers' NABLA (flex backend, eager on CPU) vs ours on the same weights and sparse params."""
    from diffusers import Kandinsky5T2VPipeline

    cfg = nabla_cfg(attention_P=0.6)
    ref_model = Kandinsky5Transformer3DModel(**cfg.to_dict()).eval()
    randomize(ref_model, seed=3)
    ref_model.set_attention_backend("flex")
    ours = CrossDiT(cfg).eval()
    ours.load_state_dict(ref_model.state_dict())
    ours.set_options(attention=AttentionOptions(rope_cast=torch.bfloat16))
    kw = inputs(cfg, batch=1, frames=2, height=32, width=32)
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(2, 2, 2, 11, 3, 3, device="cpu")
    sparse = {"sta_mask": sta[None, None], "attention_type": "nabla", "to_fractal": True, "P": 0.6, "wT": 11,
              "wH": 3, "wW": 3, "add_sta": True, "visual_shape": (2, 16, 16), "method": "topcdf"}
    with torch.no_grad():
        ref = ref_model(**kw, sparse_params=sparse).sample
        torch.testing.assert_close(ours(**kw, sparse_params=sparse).sample, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(**kw).sample, ref, atol=1e-5, rtol=0)  # params from our own config


def test_block_compile_kwargs_tune_cuda_kernels_only():
    from k5model.crossdit import block_compile_kwargs

    tuned = {"options": {"coordinate_descent_tuning": True}}
    assert block_compile_kwargs(torch.device("cuda")) == tuned
    assert block_compile_kwargs("cuda:1", dynamic=False) == {"dynamic": False, **tuned}
    assert block_compile_kwargs("cuda", options={"coordinate_descent_tuning": False, "max_autotune": True}) == {
        "options": {"coordinate_descent_tuning": False, "max_autotune": True}}  # the caller's options win
    assert block_compile_kwargs("cuda", mode="max-autotune") == {"mode": "max-autotune"}  # mode excludes options
    assert block_compile_kwargs("cpu") == {} and block_compile_kwargs("cpu", fullgraph=True) == {"fullgraph": True}


def test_runtime_options_are_validated_and_applied_temporarily():
    from k5model.runtime_options import CrossDiTOptions, NablaOptions

    with pytest.raises(ValueError, match="attention backend 'nope'"):
        AttentionOptions(backend="nope")
    with pytest.raises(ValueError, match="force_density"):
        NablaOptions(force_density=0.0)
    with pytest.raises(ValueError, match="set force_density too"):
        NablaOptions(force_total=True)
    with pytest.raises(ValueError, match="residual_dtype"):
        CrossDiTOptions(residual_dtype=torch.int64)
    model = CrossDiT(get_preset("tiny"))
    with pytest.raises(TypeError, match="AttentionOptions"):
        model.set_options(attention="math")
    assert model.set_options(attention=AttentionOptions(backend="math")) is model
    assert model.options.attention.backend == "math" and model.options.residual_dtype is None
    with pytest.raises(RuntimeError, match="inside"):
        with model.options_applied(residual_dtype=torch.float32):
            assert model.options.residual_dtype == torch.float32 and model.options.attention.backend == "math"
            raise RuntimeError("inside")
    assert model.options == CrossDiTOptions(attention=AttentionOptions(backend="math"))  # restored on error too
    model.enable_gradient_checkpointing()
    assert model.options.gradient_checkpointing


def test_residual_dtype_sets_the_stream_between_blocks():
    model = CrossDiT(get_preset("tiny")).to_mixed_precision(torch.bfloat16).eval()
    seen = []
    model.visual_transformer_blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    kw = {k: (v.bfloat16() if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v)
          for k, v in inputs(model.config, batch=1).items()}
    with torch.no_grad():
        model(**kw)
        with model.options_applied(residual_dtype=torch.float32):
            out = model(**kw).sample
    assert seen == [torch.bfloat16, torch.float32] and out.dtype == torch.bfloat16


def test_nabla_options_force_and_track_the_density():
    from k5model.runtime_options import NablaOptions

    model = CrossDiT(nabla_cfg(attention_P=0.9, attention_wT=1, attention_wH=1, attention_wW=1)).eval()
    randomize(model, seed=5)
    kw = inputs(model.config, batch=1, frames=2, height=32, width=32)  # 2x2x2 tiles: 8 blocks a row
    with torch.no_grad():
        model(**kw)
        assert model.last_nabla_density is None  # not tracked by default
        with model.options_applied(nabla=NablaOptions(track_density=True)):
            model(**kw)
        rule = model.last_nabla_density
        with model.options_applied(nabla=NablaOptions(force_density=0.25, force_total=True, track_density=True)):
            forced = model(**kw).sample
    assert 0 < rule <= 1 and model.last_nabla_density == 0.25  # 2 of 8 blocks, the STA diagonal counted inside
    with torch.no_grad():
        assert not torch.allclose(forced, model(**kw).sample, atol=1e-4)
