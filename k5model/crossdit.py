"""CrossDiT: the Cross-Attention Diffusion Transformer of Kandinsky 5.0 (report §5.2–5.4).

One readable file for the model. Module and parameter names equal those of diffusers'
``Kandinsky5Transformer3DModel`` and the official single-file checkpoints, so weights load in either direction with no
remapping, and ``forward`` takes the same keywords. On top of the inference model it adds what training needs:
a text padding mask (official semantics), packed variable-length batches (:meth:`CrossDiT.forward_packed`),
NABLA sparse attention with autograd on CPU and GPU, and per-block activation checkpointing. Runtime knobs (attention
backend, residual dtype, NABLA benchmark settings) are typed options (``k5model.runtime_options``) set through
:meth:`CrossDiT.set_options`.

Layout: visual latents are channels-last ``(B, T, H, W, C)``; inside the blocks tokens are ``(B, S, model_dim)`` and
attention heads ``(B, S, heads, head_dim)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from k5model import attention as attn_ops
from k5model import kernels
from k5model.config import CrossDiTConfig, get_preset
from k5model.runtime_options import CrossDiTOptions

if TYPE_CHECKING:
    from k5model.nabla import NablaContext, NablaParams


def _nabla():
    # Imported on first use: dense models never need the FlexAttention machinery.
    from k5model import nabla

    return nabla


# Modules whose weights stay fp32 when the rest of the model is cast to bf16 (time path and all modulations),
# matching diffusers' ``_keep_in_fp32_modules`` and the official checkpoints.
KEEP_FP32 = ("time_embeddings", "modulation", "visual_modulation", "text_modulation")


def sinusoid_freqs(dim: int, max_period: float = 10000.0, device: torch.device | None = None) -> torch.Tensor:
    """exp(-ln(max_period) * i / dim), i < dim, in fp32, built on ``device`` (no host copy inside a forward, which
    CUDA graph capture would refuse)."""
    return torch.exp(-math.log(max_period) * torch.arange(dim, dtype=torch.float32, device=device) / dim)


@dataclass
class Rope:
    """cos/sin tables ``(B|1, S, 1, head_dim/2)`` in fp32 for interleaved-pair rotation."""

    cos: torch.Tensor
    sin: torch.Tensor

    def index(self, order: torch.Tensor) -> Rope:
        return Rope(self.cos[:, order], self.sin[:, order])


def apply_rope(x: torch.Tensor, rope: Rope, cast: torch.dtype | None = None) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the angle table, in fp32 (the official code never rounds here).

    Written as ``x·cos' + swap(x)·sin'`` with per-element tables (cos repeated, sin with alternating sign) and the
    pair swap as a flip: compiled, this is one element-wise read of x, where the stack-of-halves form made inductor's
    q/k norm+RoPE kernel twice as slow (docs/benchmarks.md, "Figures behind the code"). Same values: a − b = a + (−b).
    """
    xf = x.float()
    cos = torch.repeat_interleave(rope.cos, 2, dim=-1)
    sin = torch.stack((-rope.sin, rope.sin), dim=-1).flatten(-2)
    out = xf * cos + xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin
    if cast is not None:  # emulate a library that rounds rotated q/k (diffusers rounds to bf16)
        out = out.to(cast)
    return out.to(x.dtype)


def norm_and_rope(x: torch.Tensor, weight: torch.Tensor, eps: float | None, rope: Rope | None = None,
                  cast: torch.dtype | None = None) -> torch.Tensor:
    """The composite q/k path: RMSNorm in fp32 for stability (official), rounded to x's dtype, then RoPE.
    ``k5model.kernels.rms_norm_rope`` is the same in one GPU pass."""
    y = F.rms_norm(x.float(), x.shape[-1:], weight, eps).to(x.dtype)
    return y if rope is None else apply_rope(y, rope, cast)


def text_rope(positions: torch.Tensor, head_dim: int) -> Rope:
    args = torch.outer(positions.float(), sinusoid_freqs(head_dim // 2, device=positions.device))
    return Rope(args.cos()[None, :, None], args.sin()[None, :, None])


def visual_rope(
    positions: Sequence[torch.Tensor], axes_dims: Sequence[int], scale_factor: Sequence[float]
) -> torch.Tensor:
    """Angles ``(T, H, W, head_dim/2)`` for 3D RoPE: each axis gets axis_dim/2 frequencies, divided by its scale."""
    grids = []
    sizes = [len(p) for p in positions]
    for axis, (pos, dim, scale) in enumerate(zip(positions, axes_dims, scale_factor)):
        args = torch.outer(pos.float(), sinusoid_freqs(dim // 2, device=pos.device)) / scale
        view = [1, 1, 1, dim // 2]
        view[axis] = sizes[axis]
        grids.append(args.view(view).expand(*sizes, dim // 2))
    return torch.cat(grids, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm (no affine) then adaptive scale/shift, all in fp32; result in ``dtype`` (default: the residual's)."""
    return (F.layer_norm(x.float(), x.shape[-1:]) * (1.0 + scale.float()) + shift.float()).to(dtype or x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (x.float() + gate.float() * out.float()).to(x.dtype)


class TimeEmbeddings(nn.Module):
    def __init__(self, model_dim: int, time_dim: int):
        super().__init__()
        self.model_dim = model_dim
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.out_layer = nn.Linear(time_dim, time_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = torch.outer(t.float(), sinusoid_freqs(self.model_dim // 2, device=t.device))
        emb = torch.cat([args.cos(), args.sin()], dim=-1).to(self.in_layer.weight.dtype)
        return self.out_layer(F.silu(self.in_layer(emb)))


class TextEmbeddings(nn.Module):
    """Linear + affine LayerNorm; used for Qwen states (-> model_dim) and the CLIP pooled vector (-> time_dim)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_layer(x.to(self.in_layer.weight.dtype))
        return self.norm(x).to(x.dtype)


class VisualEmbeddings(nn.Module):
    def __init__(self, in_dim: int, model_dim: int, patch_size: Sequence[int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_layer = nn.Linear(math.prod(patch_size) * in_dim, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, C) -> (B, T/pt, H/ph, W/pw, model_dim); a patch flattens as (pt, ph, pw, C)."""
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, t // pt, pt, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7).flatten(4, 7)
        return self.in_layer(x.to(self.in_layer.weight.dtype))


class Modulation(nn.Module):
    """SiLU -> Linear(time_dim -> n·model_dim), zero-initialised so every block starts as the identity."""

    def __init__(self, time_dim: int, model_dim: int, num_params: int):
        super().__init__()
        self.num_params = num_params
        self.out_layer = nn.Linear(time_dim, num_params * model_dim)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, time_embed: torch.Tensor, lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """Per-sample parameters ``(B, 1, D)`` each; for packed input ``(1, S, D)`` repeated over each segment."""
        params = self.out_layer(F.silu(time_embed.to(self.out_layer.weight.dtype)))
        if lengths is None:
            params = params[:, None]
        else:
            counts = torch.as_tensor(list(lengths), device=params.device)
            params = torch.repeat_interleave(params, counts, dim=0)[None]
        return params.chunk(self.num_params, dim=-1)


def _packed_mask(q_lengths: Sequence[int], k_lengths: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """Block-diagonal mask of a packed sequence; None for a single document, whose mask is all True: SDPA then keeps
    its fused (flash / cuDNN) kernels instead of the masked path."""
    if len(q_lengths) == 1:
        return None
    return attn_ops.document_mask(q_lengths, k_lengths, device)


@dataclass
class AttentionContext:
    """How one attention call must mask: built once per forward, shared by every block."""

    backend: str = "sdpa"
    mask: torch.Tensor | None = None  # dense bool mask for SDPA/math paths
    q_lengths: Sequence[int] | None = None  # packed: documents on the query side
    k_lengths: Sequence[int] | None = None
    key_valid: torch.Tensor | None = None  # packed: (Sk,) valid keys (text padding)
    nabla: NablaContext | None = None  # NABLA self-attention (visual tokens in fractal order)
    rope_cast: torch.dtype | None = None
    # sequence parallel (k5model.training.parallel.SequenceShards): q/k/v hold this rank's tokens; attention runs on
    # the whole sequence for this rank's heads between two all-to-all exchanges
    sequence_shards: Any = None


class Attention(nn.Module):
    def __init__(self, model_dim: int, head_dim: int):
        super().__init__()
        self.num_heads = model_dim // head_dim
        self.to_query = nn.Linear(model_dim, model_dim)
        self.to_key = nn.Linear(model_dim, model_dim)
        self.to_value = nn.Linear(model_dim, model_dim)
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = nn.Linear(model_dim, model_dim)

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, context: torch.Tensor | None = None, rope: Rope | None = None
    ) -> torch.Tensor:
        src = x if context is None else context
        q = self.to_query(x).unflatten(-1, (self.num_heads, -1))
        k = self.to_key(src).unflatten(-1, (self.num_heads, -1))
        v = self.to_value(src).unflatten(-1, (self.num_heads, -1))
        if ctx.rope_cast is None and kernels.usable(q, pow2_last_dim=True):
            # GPU inference: one Triton pass per tensor, same values (see k5model.kernels)
            tables = (rope.cos, rope.sin) if rope is not None else ()
            q = kernels.rms_norm_rope(q, self.query_norm.weight, self.query_norm.eps, *tables)
            k = kernels.rms_norm_rope(k, self.key_norm.weight, self.key_norm.eps, *tables)
        else:
            q = norm_and_rope(q, self.query_norm.weight, self.query_norm.eps, rope, ctx.rope_cast)
            k = norm_and_rope(k, self.key_norm.weight, self.key_norm.eps, rope, ctx.rope_cast)
        shards = ctx.sequence_shards
        if shards is not None:
            if context is None:
                q, k, v = shards.to_full_sequence(q, k, v)
            else:  # cross-attention: the text is whole on every rank, only its keys/values of this rank's heads
                q, = shards.to_full_sequence(q)
                k, v = shards.local_heads(k), shards.local_heads(v)
        if ctx.nabla is not None:
            out = ctx.nabla.attend(q, k, v)
        elif ctx.q_lengths is not None and ctx.backend == "flex":
            out = attn_ops.flex_document_attention(q, k, v, ctx.q_lengths, ctx.k_lengths, ctx.key_valid)
        else:
            out = attn_ops.attention(q, k, v, mask=ctx.mask, backend=ctx.backend)
        if shards is not None:
            out = shards.to_local_sequence(out)
        return self.out_layer(out.flatten(-2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(dim, ff_dim, bias=False)
        self.out_layer = nn.Linear(ff_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.in_layer(x)
        # GPU inference: the Triton exact GELU (see k5model.kernels), else inductor's / eager's
        return self.out_layer(kernels.gelu(hidden) if kernels.usable(hidden) else F.gelu(hidden))


class TextBlock(nn.Module):
    """Linguistic Token Refiner block: a CrossDiT block without cross-attention."""

    def __init__(self, cfg: CrossDiTConfig):
        super().__init__()
        self.text_modulation = Modulation(cfg.time_dim, cfg.model_dim, 6)
        self.self_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.feed_forward = FeedForward(cfg.model_dim, cfg.ff_dim)

    def forward(self, x, time_embed, rope, ctx, lengths=None):
        sa_shift, sa_scale, sa_gate, ff_shift, ff_scale, ff_gate = self.text_modulation(time_embed, lengths)
        dt = self.feed_forward.in_layer.weight.dtype  # matmul inputs; the residual x may be kept in fp32
        x = gated_residual(x, sa_gate, self.self_attention(modulate(x, sa_shift, sa_scale, dt), ctx, rope=rope))
        return gated_residual(x, ff_gate, self.feed_forward(modulate(x, ff_shift, ff_scale, dt)))


class VisualBlock(nn.Module):
    """Self-attention (3D RoPE, dense or NABLA) -> cross-attention to the refined text -> MLP."""

    def __init__(self, cfg: CrossDiTConfig):
        super().__init__()
        self.visual_modulation = Modulation(cfg.time_dim, cfg.model_dim, 9)
        self.self_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.cross_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.feed_forward = FeedForward(cfg.model_dim, cfg.ff_dim)

    def forward(self, x, text, time_embed, rope, self_ctx, cross_ctx, lengths=None):
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
         ff_shift, ff_scale, ff_gate) = self.visual_modulation(time_embed, lengths)
        dt = self.feed_forward.in_layer.weight.dtype  # matmul inputs; the residual x may be kept in fp32
        x = gated_residual(x, sa_gate, self.self_attention(modulate(x, sa_shift, sa_scale, dt), self_ctx, rope=rope))
        x = gated_residual(x, ca_gate,
                           self.cross_attention(modulate(x, ca_shift, ca_scale, dt), cross_ctx, context=text.to(dt)))
        return gated_residual(x, ff_gate, self.feed_forward(modulate(x, ff_shift, ff_scale, dt)))


class OutLayer(nn.Module):
    def __init__(self, cfg: CrossDiTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.modulation = Modulation(cfg.time_dim, cfg.model_dim, 2)
        self.out_layer = nn.Linear(cfg.model_dim, math.prod(cfg.patch_size) * cfg.out_visual_dim)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor, lengths=None) -> torch.Tensor:
        shift, scale = self.modulation(time_embed, lengths)
        return self.out_layer(modulate(x, shift, scale, self.out_layer.weight.dtype))

    def unpatchify(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, S, C·pt·ph·pw) on a (T, H, W) token grid -> (B, T·pt, H·ph, W·pw, C); features flatten as
        (C, pt, ph, pw)."""
        pt, ph, pw = self.patch_size
        t, h, w = grid
        x = x.view(x.shape[0], t, h, w, -1, pt, ph, pw).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(x.shape[0], t * pt, h * ph, w * pw, -1)


def block_compile_kwargs(device: torch.device, **compile_kwargs: Any) -> dict[str, Any]:
    """``torch.compile`` keywords for the blocks on ``device``: on CUDA, coordinate-descent tuning unless the caller's
    ``options`` set it (or a ``mode`` is given, which torch.compile does not combine with ``options``)."""
    if torch.device(device).type == "cuda" and "mode" not in compile_kwargs:
        compile_kwargs["options"] = {"coordinate_descent_tuning": True, **compile_kwargs.get("options", {})}
    return compile_kwargs


@dataclass
class CrossDiTOutput:
    sample: torch.Tensor


class CrossDiT(nn.Module):
    """Kandinsky 5.0 CrossDiT. Drop-in for diffusers' ``Kandinsky5Transformer3DModel``."""

    def __init__(self, config: CrossDiTConfig | dict[str, Any] | str):
        super().__init__()
        if isinstance(config, str):
            config = get_preset(config)
        elif isinstance(config, dict):
            config = CrossDiTConfig.from_dict(config)
        self.config = config
        cfg = config
        self.time_embeddings = TimeEmbeddings(cfg.model_dim, cfg.time_dim)
        self.text_embeddings = TextEmbeddings(cfg.in_text_dim, cfg.model_dim)
        self.pooled_text_embeddings = TextEmbeddings(cfg.in_text_dim2, cfg.time_dim)
        self.visual_embeddings = VisualEmbeddings(cfg.visual_embed_dim, cfg.model_dim, cfg.patch_size)
        self.text_transformer_blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.num_text_blocks))
        self.visual_transformer_blocks = nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.num_visual_blocks))
        self.out_layer = OutLayer(cfg)
        # runtime knobs (backend, residual dtype, NABLA benchmark settings): replaced through set_options only
        self.options = CrossDiTOptions()
        # with options.nabla.track_density: mean block density NABLA chose over the layers of the last forward
        self.last_nabla_density: float | None = None
        # set from outside (k5model.training.parallel.apply_sequence_parallel): forward_packed then splits its visual
        # tokens over a sequence-parallel group; None = the whole sequence on this process
        self.sequence_parallel: Any = None

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def visual_cond(self) -> bool:
        return self.config.visual_cond

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_embeddings.in_layer.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual_embeddings.in_layer.weight.device

    def set_options(self, options: CrossDiTOptions | None = None, /, **changes: Any) -> CrossDiT:
        """Replace the runtime options (``k5model.runtime_options``): a whole ``CrossDiTOptions``, or fields of the
        current ones by keyword, e.g. ``set_options(residual_dtype=torch.float32)`` or
        ``set_options(attention=AttentionOptions(backend="math"))``. Options are validated when built."""
        self.options = replace(options if options is not None else self.options, **changes)
        return self

    @contextlib.contextmanager
    def options_applied(self, options: CrossDiTOptions | None = None, /, **changes: Any) -> Iterator[CrossDiT]:
        """:meth:`set_options` for the duration of a ``with`` block; the previous options come back afterwards."""
        before = self.options
        self.set_options(options, **changes)
        try:
            yield self
        finally:
            self.options = before

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """diffusers' name for ``set_options(gradient_checkpointing=enabled)``."""
        self.set_options(gradient_checkpointing=enabled)

    def compile_blocks(self, **compile_kwargs: Any) -> CrossDiT:
        """torch.compile each block in place (repeated blocks share one compiled graph): fuses the fp32
        norm/modulation/gate element-wise work around the matmuls and attention.

        On CUDA, inductor's coordinate-descent tuning of the fused kernels' block sizes is on unless ``options`` say
        otherwise (or a ``mode`` is given): slightly faster kernels for a longer first compile (docs/benchmarks.md)."""
        compile_kwargs = block_compile_kwargs(self.device, **compile_kwargs)
        for block in [*self.text_transformer_blocks, *self.visual_transformer_blocks]:
            block.compile(**compile_kwargs)
        return self

    def _block(self, block: nn.Module, *args: Any) -> torch.Tensor:
        if self.options.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _embed_condition(self, text: torch.Tensor, timestep: torch.Tensor, pooled: torch.Tensor):
        time_embed = self.time_embeddings(timestep)
        return self._residual(self.text_embeddings(text)), time_embed + self.pooled_text_embeddings(pooled)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.options.residual_dtype
        return x if dtype is None else x.to(dtype)

    def _nabla_params(self, sparse_params: dict[str, Any] | None) -> NablaParams | None:
        """The forward's NABLA rule: diffusers' ``sparse_params`` dict over the config, or the config's (defaults of
        the official 10 s models); None for dense attention."""
        cfg, params = self.config, _nabla().NablaParams
        if sparse_params is not None:
            return params(P=sparse_params.get("P", cfg.attention_P), wT=sparse_params.get("wT", cfg.attention_wT),
                          wH=sparse_params.get("wH", cfg.attention_wH), wW=sparse_params.get("wW", cfg.attention_wW),
                          add_sta=sparse_params.get("add_sta", cfg.attention_add_sta))
        if cfg.attention_type != "nabla":
            return None
        return params(P=cfg.attention_P if cfg.attention_P is not None else 0.9, wT=cfg.attention_wT or 11,
                      wH=cfg.attention_wH or 3, wW=cfg.attention_wW or 3,
                      add_sta=True if cfg.attention_add_sta is None else cfg.attention_add_sta)

    def _nabla_context(self, params: NablaParams, grids: Sequence[Sequence[int]], device) -> NablaContext:
        opts = self.options
        return _nabla().nabla_context(
            params, grids, device, force_density=opts.nabla.force_density, force_total=opts.nabla.force_total,
            backend="sdpa_masked" if opts.attention.backend == "math" else "auto",
            track_density=opts.nabla.track_density)

    def _record_density(self, ctx: AttentionContext) -> None:
        density = ctx.nabla.mean_density() if ctx.nabla is not None else None
        if density is not None:
            self.last_nabla_density = density

    # ----------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        visual_rope_pos: Sequence[torch.Tensor],
        text_rope_pos: torch.Tensor,
        scale_factor: Sequence[float] = (1.0, 1.0, 1.0),
        sparse_params: dict[str, Any] | None = None,
        return_dict: bool = True,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> CrossDiTOutput | torch.Tensor:
        """Velocity for a batch of equally shaped latents.

        hidden_states (B, T, H, W, C_in); encoder_hidden_states (B, L, D_text); timestep (B,) = t·1000;
        pooled_projections (B, D_pool); visual_rope_pos = positions per latent-patch axis; text_rope_pos (L,);
        encoder_attention_mask (B, L) bool, True = real token (masked in text self- and cross-attention).
        """
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be (B, T, H, W, C), got shape {tuple(hidden_states.shape)}")
        if hidden_states.shape[-1] != self.config.visual_embed_dim:
            raise ValueError(
                f"hidden_states has {hidden_states.shape[-1]} channels, the model expects "
                f"{self.config.visual_embed_dim} (visual_cond={self.config.visual_cond})"
            )
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        cfg = self.config
        backend, rope_cast = self.options.attention.backend, self.options.attention.rope_cast
        text, time_embed = self._embed_condition(encoder_hidden_states, timestep, pooled_projections)
        key_mask = attn_ops.key_padding_mask(encoder_attention_mask)
        text_ctx = AttentionContext(backend, mask=key_mask, rope_cast=rope_cast)
        t_rope = text_rope(text_rope_pos.to(text.device), cfg.head_dim)
        with attn_ops.sdpa_priority(text.is_cuda):
            for block in self.text_transformer_blocks:
                text = self._block(block, text, time_embed, t_rope, text_ctx)

        x = self._residual(self.visual_embeddings(hidden_states))
        grid = x.shape[1:4]
        angles = visual_rope(visual_rope_pos, cfg.axes_dims, scale_factor).to(x.device)
        v_rope = Rope(angles.cos().flatten(0, 2)[None, :, None], angles.sin().flatten(0, 2)[None, :, None])
        x = x.flatten(1, 3)
        nabla_params = self._nabla_params(sparse_params)
        self_ctx = AttentionContext(backend, rope_cast=rope_cast)
        if nabla_params is not None:
            order = _nabla().fractal_order(*grid, device=x.device)
            x, v_rope = x[:, order], v_rope.index(order)
            self_ctx.nabla = self._nabla_context(nabla_params, [grid], x.device)
        cross_ctx = AttentionContext(backend, mask=key_mask)
        with attn_ops.sdpa_priority(x.is_cuda):
            for block in self.visual_transformer_blocks:
                x = self._block(block, x, text, time_embed, v_rope, self_ctx, cross_ctx)
        if nabla_params is not None:
            x = x[:, torch.argsort(order)]
            self._record_density(self_ctx)
        out = self.out_layer.unpatchify(self.out_layer(x, time_embed), grid)
        return CrossDiTOutput(sample=out) if return_dict else out

    def forward_packed(
        self,
        hidden_states: Sequence[torch.Tensor],
        encoder_hidden_states: Sequence[torch.Tensor],
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        scale_factor: Sequence[float] | Sequence[Sequence[float]] = (1.0, 1.0, 1.0),
        attention_type: str | None = None,
    ) -> list[torch.Tensor]:
        """Several latents of different shapes in ONE sequence with block-diagonal attention.

        hidden_states: N tensors (T_i, H_i, W_i, C_in); encoder_hidden_states: N tensors (L_i, D_text) holding only
        real tokens (padding is never packed); timestep (N,); pooled_projections (N, D_pool). Every sample keeps its
        own time modulation, RoPE positions and text. Returns N velocities (T_i, H_i, W_i, C_out).
        """
        n = len(hidden_states)
        if not (len(encoder_hidden_states) == n == timestep.shape[0] == pooled_projections.shape[0]):
            raise ValueError(
                f"packed batch sizes disagree: {n} latents, {len(encoder_hidden_states)} texts, "
                f"{timestep.shape[0]} timesteps, {pooled_projections.shape[0]} pooled vectors"
            )
        cfg = self.config
        backend, rope_cast = self.options.attention.backend, self.options.attention.rope_cast
        scales = [tuple(scale_factor)] * n if not isinstance(scale_factor[0], Sequence) else list(scale_factor)
        device = pooled_projections.device
        text_lengths = [int(t.shape[0]) for t in encoder_hidden_states]
        text, time_embed = self._embed_condition(torch.cat(list(encoder_hidden_states))[None], timestep,
                                                 pooled_projections)
        use_flex = backend == "flex"
        t_ropes = [text_rope(torch.arange(n_l, device=device), cfg.head_dim) for n_l in text_lengths]
        t_rope = Rope(torch.cat([r.cos for r in t_ropes], dim=1), torch.cat([r.sin for r in t_ropes], dim=1))
        if use_flex:
            text_ctx = AttentionContext("flex", q_lengths=text_lengths, k_lengths=text_lengths)
        else:
            text_ctx = AttentionContext(backend, mask=_packed_mask(text_lengths, text_lengths, device))
        text_ctx.rope_cast = rope_cast
        for block in self.text_transformer_blocks:
            text = self._block(block, text, time_embed, t_rope, text_ctx, text_lengths)

        use_nabla = (attention_type or cfg.attention_type) == "nabla"
        tokens, cos, sin, grids = [], [], [], []
        for lat, scale in zip(hidden_states, scales):
            x = self._residual(self.visual_embeddings(lat[None]))
            grid = tuple(x.shape[1:4])
            pos = [torch.arange(s, device=device) for s in grid]
            angles = visual_rope(pos, cfg.axes_dims, scale).flatten(0, 2)
            x = x.flatten(1, 3)
            if use_nabla:
                order = _nabla().fractal_order(*grid, device=device)
                x, angles = x[:, order], angles[order]
            tokens.append(x)
            cos.append(angles.cos())
            sin.append(angles.sin())
            grids.append(grid)
        lengths = [math.prod(g) for g in grids]
        x = torch.cat(tokens, dim=1)
        v_rope = Rope(torch.cat(cos)[None, :, None], torch.cat(sin)[None, :, None])
        if use_nabla:
            params = self._nabla_params(None) or self._nabla_params({})
            self_ctx = AttentionContext(backend, rope_cast=rope_cast,
                                        nabla=self._nabla_context(params, grids, device))
        elif use_flex:
            self_ctx = AttentionContext("flex", q_lengths=lengths, k_lengths=lengths, rope_cast=rope_cast)
        else:
            self_ctx = AttentionContext(backend, mask=_packed_mask(lengths, lengths, device), rope_cast=rope_cast)
        if use_flex:
            cross_ctx = AttentionContext("flex", q_lengths=lengths, k_lengths=text_lengths)
        else:
            cross_ctx = AttentionContext(backend, mask=_packed_mask(lengths, text_lengths, device))
        shards, local_lengths = None, lengths
        if self.sequence_parallel is not None:  # this rank keeps its run of the tokens; masks stay whole-sequence
            shards = self.sequence_parallel.shards(x.shape[1])
            self_ctx.sequence_shards = cross_ctx.sequence_shards = shards
            x, local_lengths = shards.shard(x), shards.local_lengths(lengths)
            v_rope = Rope(shards.shard(v_rope.cos), shards.shard(v_rope.sin))
        with attn_ops.sdpa_priority(x.is_cuda):
            for block in self.visual_transformer_blocks:
                x = self._block(block, x, text, time_embed, v_rope, self_ctx, cross_ctx, local_lengths)
        self._record_density(self_ctx)
        x = self.out_layer(x, time_embed, local_lengths)
        x = (x if shards is None else shards.gather(x))[0]
        outs = []
        for part, grid in zip(x.split(lengths), grids):
            if use_nabla:
                part = part[torch.argsort(_nabla().fractal_order(*grid, device=device))]
            outs.append(self.out_layer.unpatchify(part[None], grid)[0])
        return outs

    # ----------------------------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to_mixed_precision(self, dtype: torch.dtype = torch.bfloat16) -> CrossDiT:
        """Cast to ``dtype`` but keep the time path and modulations in fp32 (official layout)."""
        for name, module in self.named_modules():
            if not any(part in KEEP_FP32 for part in name.split(".")):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(dtype)
        return self

    def save_pretrained(self, save_directory, *, max_shard_size: int = 10 * 2**30, safe_serialization: bool = True):
        """Write a diffusers ``transformer/`` folder: config.json + safetensors (sharded past ``max_shard_size``)."""
        from k5model.checkpoint import save_transformer_folder

        return save_transformer_folder(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        config: CrossDiTConfig | str | dict | None = None,
        subfolder: str | None = None,
        **overrides: Any,
    ) -> CrossDiT:
        """Load a diffusers transformer folder, a pipeline folder (its ``transformer/``) or an official single file."""
        from k5model.checkpoint import load_crossdit

        return load_crossdit(cls, path, torch_dtype=torch_dtype, device=device, config=config, subfolder=subfolder,
                             **overrides)


def widen_to_visual_cond(state: dict[str, torch.Tensor], config: CrossDiTConfig) -> dict[str, torch.Tensor]:
    """A text-to-image state dict made loadable into a ``visual_cond`` model of ``config`` (report §6.3.1: the
    editing stages start from the T2I MR checkpoint). The input projection gains the 16 condition + 1 mask channels
    with zero weights, so the widened model computes exactly what its parent did until training moves them; every
    other tensor is unchanged. A state that already has the channels is returned as is."""
    key = "visual_embeddings.in_layer.weight"
    weight = state[key]
    patch = math.prod(config.patch_size)
    have, want = weight.shape[1] // patch, config.visual_embed_dim
    if have == want:
        return state
    if not config.visual_cond or have != config.in_visual_dim:
        raise ValueError(f"{key} has {have} channels per patch voxel; cannot widen it to {want} "
                         f"(visual_cond={config.visual_cond}, in_visual_dim={config.in_visual_dim})")
    # a patch flattens as (pt, ph, pw, C): pad C per voxel, keeping each voxel's latent channels in place
    wide = weight.new_zeros(weight.shape[0], patch, want)
    wide[:, :, :have] = weight.reshape(weight.shape[0], patch, have)
    return {**state, key: wide.reshape(weight.shape[0], patch * want)}
