"""Every change this project makes to private torch internals (``torch._dynamo``, ``torch._inductor``), in one place.

Each patch checks that the internal it touches exists in the running torch. Where it does not, the patch is a no-op
that warns once (the model then runs on torch's defaults: correct, only slower) and reports False, rather than failing
deep inside a compile. Written against torch 2.6-2.13; the names each patch needs are listed in its docstring.

- :func:`raise_recompile_limit` / :func:`recompile_limits`: room for dynamo to keep many compiled variants of one code
  object. A compiled block or encoder level that meets more shapes or settings than the default limit silently runs
  eagerly from then on. (The config was renamed in torch 2.6: ``cache_size_limit`` -> ``recompile_limit``.)
- :func:`enable_64_token_flex_backward`: a 64x64 FlexAttention backward tile config for NABLA's 64-token block masks.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{message} (torch {torch.__version__}); running with torch's defaults", stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------------
# dynamo recompile limits
def recompile_limit_names(config: Any = None) -> tuple[str, str] | None:
    """(per-code-object limit, accumulated limit) names in dynamo's config (or ``config``): ``recompile_limit`` since
    torch 2.6, ``cache_size_limit`` before; None when it has neither."""
    config = torch._dynamo.config if config is None else config
    for names in (("recompile_limit", "accumulated_recompile_limit"),
                  ("cache_size_limit", "accumulated_cache_size_limit")):
        if all(hasattr(config, n) for n in names):
            return names
    return None


def raise_recompile_limit(limit: int, *, config: Any = None) -> bool:
    """Let dynamo keep at least ``limit`` compiled variants per code object, for the rest of the process (never lowers
    it). False, with a warning, when dynamo's config (or ``config``) has no such limit."""
    config = torch._dynamo.config if config is None else config
    names = recompile_limit_names(config)
    if names is None:
        _warn_once("recompile_limit", "dynamo's config has no recompile_limit/cache_size_limit")
        return False
    setattr(config, names[0], max(getattr(config, names[0]), limit))
    return True


def recompile_limits(limit: int, accumulated: int, *, config: Any = None) -> contextlib.AbstractContextManager:
    """Context in which dynamo keeps ``limit`` variants per code object and ``accumulated`` in all; a context that
    changes nothing, with a warning, when dynamo's config (or ``config``) has no such limits."""
    config = torch._dynamo.config if config is None else config
    names = recompile_limit_names(config)
    if names is None:
        _warn_once("recompile_limit", "dynamo's config has no recompile_limit/cache_size_limit")
        return contextlib.nullcontext()
    return config.patch({names[0]: limit, names[1]: accumulated})


# ---------------------------------------------------------------------------------------------------------------------
# FlexAttention backward tiles for 64-token block masks
_FLEX_64_BACKWARD: bool | None = None
FLEX_64 = 64  # k5model.nabla.BLOCK; not imported, so that this module depends on torch only


def enable_64_token_flex_backward() -> bool:
    """Let inductor compile FlexAttention's backward on 64-token BlockMasks; True when available.

    Inductor filters its backward tile configs by whether they divide the BlockMask's block size *before* applying
    user ``kernel_options``, and its only H100 config for head_dim 64 is 128 wide, so a 64-token mask finds no config.
    We add a 64×64 config to the configs inductor's choices object proposes. The method is wrapped on the
    ``InductorChoices`` class rather than installed as a per-thread handler: inductor keeps one handler per thread and
    the backward graph is compiled on autograd's device thread, whose handler may already exist (a dense backward
    compiled earlier in the process kept the default one, and a 10 s NABLA training step then found no config).
    Configs that already exist are kept, so other flex users of the process still get theirs.

    Needs ``torch._inductor.choices.InductorChoices.get_flex_attention_bwd_configs`` and
    ``torch._inductor.template_heuristics.triton.FlexBwDConfig``; without them, False with a warning (NABLA training
    then uses 128-token kernel blocks, see ``k5model.nabla.nabla_attention``).
    """
    global _FLEX_64_BACKWARD
    if _FLEX_64_BACKWARD is not None:
        return _FLEX_64_BACKWARD
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.template_heuristics.triton import FlexBwDConfig
    except ImportError as err:
        _warn_once("flex64", f"no inductor flex backward config hook ({err})")
        _FLEX_64_BACKWARD = False
        return False
    original = getattr(InductorChoices, "get_flex_attention_bwd_configs", None)
    if original is None:
        _warn_once("flex64", "InductorChoices has no get_flex_attention_bwd_configs")
        _FLEX_64_BACKWARD = False
        return False
    if not getattr(original, "_k5_flex64", False):
        extra = FlexBwDConfig(FLEX_64, FLEX_64, FLEX_64, FLEX_64, 3, 4)

        def get_flex_attention_bwd_configs(self, *args, **kwargs):
            configs = list(original(self, *args, **kwargs))
            device_type = kwargs.get("device_type", args[2] if len(args) > 2 else None)
            if device_type != "cuda" or extra in configs:  # GPU kernels only; FlexAttention has no CPU backward
                return configs
            return [*configs, extra]

        get_flex_attention_bwd_configs._k5_flex64 = True  # type: ignore[attr-defined]
        InductorChoices.get_flex_attention_bwd_configs = get_flex_attention_bwd_configs
    _FLEX_64_BACKWARD = True
    return True
