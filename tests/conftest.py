"""Session-wide test setup: offline Hugging Face libraries and the tiny pipeline folders (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub: every model loads from a local folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _tiny(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    from k5model.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / f"tiny_{kind}", kind=kind, seed=0)


@pytest.fixture(scope="session")
def tiny_t2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "t2v")


@pytest.fixture(scope="session")
def tiny_i2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "i2v")


@pytest.fixture(scope="session")
def tiny_t2i_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "t2i")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy CI box (2 threads ran 6x slower there)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
