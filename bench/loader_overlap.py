"""Overlapped I/O: the training step streaming latent shards from the local object store against the same step on
batches already in memory. Three modes on one trainer, each on the same batches (checked by sample ids):

* ``in_memory``: the packed batches built beforehand (latents on the device, text embedded) and replayed;
* ``stream_prefetch``: ``ShardLatentSource(prefetch=N)``: archives read and unpacked in a worker process, ahead of
  the step in a bounded queue (the default of ``k5 train``);
* ``stream_inline``: ``ShardLatentSource(prefetch=0)``: archives read and unpacked in the training process.

The transformer is the preset's at full size with its text input widths set to the tiny pipeline's encoders (the text
encoders are not what this measures; their cost, on the fly in both stream modes, is inside ``data_wait_s``).

    python -m bench.loader_overlap            # video_lite, 5 s at 512x768 (31x64x96 latents, fp16 shards), bf16, AC
    python -m bench.loader_overlap --smoke    # tiny model on CPU; for CI

Target (issue 19): ``stream_prefetch`` step time within 2% of ``in_memory``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import device_info, peak_gb, write_result


class TimedSource(Iterator[Any]):
    """Wraps a data source; records the seconds each ``next`` took (the step's wait for its batch)."""

    def __init__(self, source: Iterator[Any]):
        self.source, self.waits = source, []

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        batch = next(self.source)
        self.waits.append(time.perf_counter() - t0)
        return batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--preset", default=None, help="model preset (default video_lite; tiny with --smoke)")
    ap.add_argument("--latent", default=None, help="TxHxW latent shape of a sample (default 31x64x96; 2x8x8 smoke)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 8; 4 with --smoke)")
    ap.add_argument("--prefetch", type=int, default=32, help="samples the worker reads ahead")
    ap.add_argument("--per-archive", type=int, default=4, help="samples per tar archive")
    a = ap.parse_args()
    from k5cli.train_run import init_distributed
    from k5data.latents.shards import LatentSample, write_shards
    from k5data.loading.training_source import ShardLatentSource, TextEncoders
    from k5data.object_store import LocalStore
    from k5model.config import get_preset
    from k5model.crossdit import CrossDiT
    from k5model.tiny import build_tiny_pipeline
    from k5model.training.config import StageConfig
    from k5model.training.parallel import apply_activation_checkpointing, apply_fsdp
    from k5model.training.trainer import Trainer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    preset = a.preset or ("tiny" if a.smoke else "video_lite")
    t, h, w = (int(x) for x in (a.latent or ("2x8x8" if a.smoke else "31x64x96")).split("x"))
    steps = a.steps or (4 if a.smoke else 8)
    init_distributed()
    root = Path(tempfile.mkdtemp(prefix="k5-loader-bench-"))
    text = TextEncoders.from_pretrained(build_tiny_pipeline(root / "tiny_t2v"), device=device)
    # one batch = one sample (t_max = t); the packing queue holds two, so steps + warm-up + 3 samples per mode
    n = 3 * (steps + 4)
    rng = np.random.default_rng(0)
    store = LocalStore(root / "objects")
    write_shards((LatentSample(f"v{i:05d}", rng.standard_normal((t, h, w, 16), dtype=np.float32).astype(np.float16),
                               f"clip {i}", 24.0, "low") for i in range(n)),
                 store, "bench", per_shard={("video", "low"): a.per_archive})
    stage = StageConfig(name="loader_bench", steps=steps, batch=1, lr=1e-4, tasks={"t2v": 1.0}, frames=t,
                        resolutions={f"{h}x{w}": 1.0}, bf16=cuda, activation_checkpointing=cuda, uncond_prob=0.0)
    torch.manual_seed(0)
    model = CrossDiT(get_preset(preset, in_text_dim=text.text_dim, in_text_dim2=text.pooled_dim)).to(device)
    if cuda:
        apply_activation_checkpointing(model)
    apply_fsdp(model, param_dtype=torch.bfloat16 if cuda else None)

    def source(prefetch: int) -> ShardLatentSource:
        return ShardLatentSource(store, "bench", stage, text, t_max=t, device=device, prefetch=prefetch)

    inline_source = source(0)
    replay = [next(inline_source) for _ in range(steps + 2)]
    trainer = Trainer(model, stage, iter(replay), text.null_condition(), device=device)
    results: dict[str, Any] = {}
    ids: dict[str, list[list[str]]] = {}
    for mode in ("in_memory", "stream_prefetch", "stream_inline"):
        data = {"in_memory": lambda: iter(replay), "stream_prefetch": lambda: source(a.prefetch),
                "stream_inline": lambda: source(0)}[mode]()
        timed = TimedSource(data)
        trainer.data = timed
        step_s = []
        for i in range(steps + 2):  # two warm-up steps (allocator; the worker's spawn) are not timed
            t0 = time.perf_counter()
            trainer.train_step()  # reads the loss back: the device is synchronised
            if i >= 2:
                step_s.append(time.perf_counter() - t0)
        ids[mode] = [b.ids for b in replay] if mode == "in_memory" else None
        if mode != "in_memory":
            fresh = source(0)  # the batches this mode trained on, for the same-batches check
            ids[mode] = [next(fresh).ids for _ in range(steps + 2)]
            data.close()
        results[mode] = {"step_s": statistics.median(step_s), "data_wait_s": statistics.median(timed.waits[2:]),
                         "step_s_all": step_s}
    res = {**device_info(cuda), "preset": preset, "latent": [t, h, w], "sample_mb": t * h * w * 16 * 2 / 1e6,
           "prefetch": a.prefetch, "per_archive": a.per_archive, **results,
           "stream_vs_memory": results["stream_prefetch"]["step_s"] / results["in_memory"]["step_s"],
           "inline_vs_memory": results["stream_inline"]["step_s"] / results["in_memory"]["step_s"],
           "same_batches": ids["in_memory"] == ids["stream_prefetch"] == ids["stream_inline"],
           "peak_gb": peak_gb(), "date": time.strftime("%Y-%m-%d")}
    write_result("loader_overlap.json", res)


if __name__ == "__main__":
    main()
