"""The one module that patches private torch internals: each patch works on this torch, and degrades to a warned
no-op where the internal it needs is missing."""

from __future__ import annotations

import threading
import types
import warnings

import pytest
import torch

from k5model import torch_patches


def test_recompile_limits_patch_and_restore():
    cfg = torch._dynamo.config
    per_object, total = torch_patches.recompile_limit_names()
    before = getattr(cfg, per_object), getattr(cfg, total)
    with torch_patches.recompile_limits(before[0] + 7, before[1] + 9):
        assert (getattr(cfg, per_object), getattr(cfg, total)) == (before[0] + 7, before[1] + 9)
    assert (getattr(cfg, per_object), getattr(cfg, total)) == before
    assert torch_patches.raise_recompile_limit(1)  # never lowers the limit
    assert getattr(cfg, per_object) == before[0]


def test_recompile_limit_names_of_old_new_and_missing_configs():
    new = types.SimpleNamespace(recompile_limit=8, accumulated_recompile_limit=256)
    old = types.SimpleNamespace(cache_size_limit=8, accumulated_cache_size_limit=256)
    assert torch_patches.recompile_limit_names(new) == ("recompile_limit", "accumulated_recompile_limit")
    assert torch_patches.recompile_limit_names(old) == ("cache_size_limit", "accumulated_cache_size_limit")
    assert torch_patches.recompile_limit_names(types.SimpleNamespace(cache_size_limit=8)) is None
    assert torch_patches.raise_recompile_limit(64, config=old) and old.cache_size_limit == 64


def test_missing_internal_is_a_warned_no_op(monkeypatch):
    monkeypatch.setattr(torch_patches, "_WARNED", set())
    bare = types.SimpleNamespace()
    with pytest.warns(UserWarning, match="no recompile_limit/cache_size_limit"):
        assert torch_patches.raise_recompile_limit(64, config=bare) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not on every call
        with torch_patches.recompile_limits(64, 512, config=bare):
            pass
    assert vars(bare) == {}


def test_64_token_backward_config_reaches_handlers_made_before_and_in_other_threads():
    """The 64x64 flex backward config must reach every inductor choices handler, including one created before the hook
    (autograd's device thread keeps the handler it made for an earlier dense backward)."""
    choices = pytest.importorskip("torch._inductor.choices")
    early = choices.InductorChoices()
    if not torch_patches.enable_64_token_flex_backward():
        pytest.skip("this torch build has no flex backward config hook")
    method = type(early).get_flex_attention_bwd_configs
    assert getattr(method, "_k5_flex64", False)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(choices.InductorChoices().get_flex_attention_bwd_configs))
    thread.start()
    thread.join()
    assert getattr(seen[0].__func__, "_k5_flex64", False)
    # CPU configs are left alone (FlexAttention has no CPU backward); enabling twice wraps once
    before = early.get_flex_attention_bwd_configs(64, torch.float32, "cpu")
    assert torch_patches.enable_64_token_flex_backward()
    assert early.get_flex_attention_bwd_configs(64, torch.float32, "cpu") == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor proposes CUDA configs on a CUDA device only")
def test_64_token_backward_config_is_proposed_for_cuda():
    from torch._inductor.choices import InductorChoices

    assert torch_patches.enable_64_token_flex_backward()
    configs = InductorChoices().get_flex_attention_bwd_configs(64, torch.bfloat16, "cuda")
    assert any((c.block_m1, c.block_n1, c.block_m2, c.block_n2) == (64, 64, 64, 64) for c in configs)


def test_no_private_torch_patch_outside_this_module():
    """Assignments to torch._* internals live in k5model/torch_patches.py only."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "k5model"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "torch_patches.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            private = ("torch._dynamo", "torch._inductor")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(private):
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno} imports {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in ("_dynamo", "_inductor"):
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno} uses torch.{node.attr}")
    assert not offenders, offenders
