"""Helpers shared by the test modules: ``from helpers import ...`` (pytest puts tests/ on sys.path; ``bench`` is
imported from the repository root, which ``python -m pytest`` run there, as ``make test`` does, puts on sys.path).

Model-level helpers are the library's (``k5model.synthetic``), local servers the benchmarks' (``bench.common``);
they are re-exported here so that tests have one place to import from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import free_port, moto_s3_server
from k5model.config import CrossDiTConfig
from k5model.synthetic import forward_inputs, randomize

__all__ = ["free_port", "json_records", "load_dcp", "moto_s3_server", "randomize", "small_forward_inputs",
           "step_losses"]


def small_forward_inputs(cfg: CrossDiTConfig, batch: int = 2, frames: int = 3, height: int = 8, width: int = 12,
                         text_len: int = 7, seed: int = 1, timestep: float | Sequence[float] | None = None
                         ) -> dict[str, Any]:
    """The tests' CPU-sized forward (fp32): by default two samples at t·1000 = 300 and 900 on 3×8×12 latents."""
    steps = (300.0, 900.0)[:batch] if timestep is None else timestep
    return forward_inputs(cfg, frames, height, width, text_len, batch=batch, timestep=steps, seed=seed)



def load_dcp(path: Path) -> dict:
    """A sharded DCP checkpoint folder as one state dict (converted beside it to a torch.save file)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path, target)
    return torch.load(target, weights_only=False)


def json_records(stdout: str) -> list[dict]:
    """The JSON lines a training run printed (``k5cli.train_run``: one per step, plus start/done events)."""
    import json

    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def step_losses(records: list[dict]) -> dict[int, float]:
    """Step -> loss of a run's JSON records."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def write_curated_dataset(root: Path, tag: str = "") -> Path:
    """A small curated dataset in the real layout (curation's ``write_outputs``) under ``root/curated``: three images
    (one rejected, one with text boxes) and one video scene, media files in ``root/raw``; media ids end in ``tag``.
    Returns the dataset folder (read it with ``k5data.curation.output.read_dataset``)."""
    import numpy as np
    from PIL import Image

    from k5data.curation.config import load_config
    from k5data.curation.output import COLUMNS, write_outputs

    media = root / "raw"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (kind, passed, boxes, q) in enumerate([("image", True, 0, 4.0), ("image", True, 3, 3.0),
                                                  ("image", False, 0, 5.0), ("video", True, 0, 2.0)]):
        path = media / (f"clip{k}{tag}.mp4" if kind == "video" else f"img{k}{tag}.png")
        if kind == "video":
            path.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real clip " + tag.encode())
        else:
            Image.fromarray(np.full((32, 48, 3), 40 * k + len(tag), np.uint8)).save(path)
        row = {c: None for c in COLUMNS}
        row.update({"media_id": f"m{k}{tag}", "source_uri": str(path), "source": "local", "kind": kind,
                    "scene_index": 0, "width": 48, "height": 32, "size": path.stat().st_size, "bucket": 256,
                    "cluster": k % 2, "caption": f"a photo number {k}", "domain": "nature", "passed": passed,
                    "text_boxes": boxes, "quality_aesthetic": q, "start_s": 0.0 if kind == "video" else None,
                    "end_s": 1.5 if kind == "video" else None})
        rows.append(row)
    write_outputs(rows, [], str(root / "curated"), load_config())
    return root / "curated"


def tiny_demo_trainer() -> Any:
    """A single-process ``Trainer`` of the tiny_demo stage on synthetic batches (weights seeded: every call builds the
    same trainer)."""
    import torch

    from k5model.crossdit import CrossDiT
    from k5model.training.config import get_stage
    from k5model.training.trainer import SyntheticLatentSource, Trainer

    stage = get_stage("tiny_demo")
    torch.manual_seed(0)
    model = CrossDiT(stage.model_preset)
    data = SyntheticLatentSource(stage, text_dim=model.config.in_text_dim, pooled_dim=model.config.in_text_dim2)
    return Trainer(model, stage, data, data.null_condition())
