"""Training batches from latent shards (k5data.loading.training_source) and the packed flow-matching loss: packed equals
batched on equal shapes, per-sample task mix and condition channels, disjoint archives per rank, exact resume, and
the trainer's packed step."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from k5data.latents.shards import LatentSample, read_index, write_shards
from k5data.loading.training_source import ShardLatentSource, TextEncoders
from k5data.object_store import LocalStore
from k5model.crossdit import CrossDiT
from k5model.flow_matching import flow_matching_loss, flow_matching_loss_packed
from k5model.training.config import StageConfig
from k5model.training.trainer import Trainer

MIX = {"t2i": 0.04, "edit": 0.16, "t2v": 0.5, "i2v": 0.3}  # image steps 0.2 of which edit 0.8 (on pairs)
PER_SHARD = {("image", r): 8 for r in ("low", "medium", "high")} | {("video", r): 3 for r in ("low", "medium", "high")}


def _stage(**kw: object) -> StageConfig:
    base = dict(name="shards", steps=4, batch=2, lr=1e-3, tasks=MIX, frames=4, uncond_prob=0.1, seed=3,
                ema_decay=0.9)
    return StageConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def text(tiny_t2v_dir: Path) -> TextEncoders:
    return TextEncoders.from_pretrained(tiny_t2v_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """120 videos (2-4 latent frames, two aspect ratios) and 80 images, 30 of them editing pairs."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(120):
        h, w = ((4, 6), (6, 4))[i % 2]
        lat = rng.standard_normal((int(rng.integers(2, 5)), h, w, 16)).astype(np.float32)
        samples.append(LatentSample(f"v{i:03d}", lat, f"video {i}", 24.0, "low"))
    for i in range(80):
        lat = rng.standard_normal((1, 4, 4, 16)).astype(np.float32)
        src = rng.standard_normal((1, 4, 4, 16)).astype(np.float32) if i < 30 else None
        samples.append(LatentSample(f"i{i:03d}", lat, f"image {i}", 0.0, "low", source_latent=src))
    store = LocalStore(tmp_path_factory.mktemp("shards"))
    write_shards(samples, store, "ds", per_shard=PER_SHARD)
    return store


def test_packed_loss_equals_batched_loss_on_equal_shapes(one_thread: None) -> None:
    torch.manual_seed(0)
    model = CrossDiT("tiny").eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 6, 16, generator=g)
    lengths = [5, 3, 6]
    embeds = torch.randn(3, 6, 32, generator=g)
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    pooled = torch.randn(3, 32, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    noise = torch.randn(x0.shape, generator=g)
    i2v = torch.tensor([False, True, False])
    batched, aux = flow_matching_loss(model, x0, embeds * mask[..., None], mask, pooled, t=t, noise=noise,
                                      visual_cond=i2v)
    cond = [torch.zeros(2, 4, 6, 17) for _ in range(3)]
    cond[1][:1, ..., :16], cond[1][:1, ..., 16] = x0[1, :1], 1.0  # I2V: frame 0 + mask on frame 0
    packed, paux = flow_matching_loss_packed(model, list(x0), [e[:n] for e, n in zip(embeds, lengths)], pooled,
                                             condition=cond, clean_frames=[0, 1, 0], t=t, noise=list(noise))
    assert torch.allclose(packed, batched, atol=1e-5)
    assert torch.allclose(paux["loss_per_sample"], aux["loss_per_sample"], atol=1e-5)
    assert paux["tokens"] == 3 * 2 * 2 * 3  # T x H/2 x W/2 per sample
    with pytest.raises(ValueError, match="sizes disagree"):
        flow_matching_loss_packed(model, list(x0), [embeds[0]], pooled)
    with pytest.raises(ValueError, match="clean_frames"):
        flow_matching_loss_packed(model, list(x0), list(embeds), pooled, clean_frames=[0, 2, 0])


def test_task_mix_per_sample_and_condition_channels(shards: LocalStore, text: TextEncoders) -> None:
    src = ShardLatentSource(shards, "ds", _stage(), text, t_max=8)
    tasks: Counter[str] = Counter()
    image_steps = 0
    for _ in range(150):
        b = next(src)
        assert len(b.x0) == len(b.text_embeds) == b.pooled.shape[0] == len(b.condition)
        assert sum(x.shape[0] for x in b.x0) <= 8 or len(b.x0) == 1  # packed up to t_max frames
        image_steps += b.is_image
        assert {x.shape[0] == 1 for x in b.x0} == {b.is_image}  # images only in image-only batches
        for x, c, task, k, e in zip(b.x0, b.condition, b.tasks, b.clean_frames, b.text_embeds):
            tasks[task] += 1
            assert (task in ("t2i", "edit")) == b.is_image
            assert e.ndim == 2 and e.shape[1] == 32 and e.abs().sum(1).gt(0).all()  # real tokens only
            assert k == (1 if task == "i2v" else 0)
            if task == "i2v":
                assert torch.equal(c[0, ..., :16], x[0]) and (c[0, ..., 16] == 1).all() and not c[1:].any()
            elif task == "edit":
                assert (c[..., 16] == 1).all() and not torch.equal(c[..., :16], x)  # the source, mask ones
            else:
                assert not c.any()
    videos = tasks["t2v"] + tasks["i2v"]
    assert abs(image_steps / 150 - 0.2) < 0.08  # the stage's p(t2i) + p(edit) of steps
    assert abs(tasks["i2v"] / videos - 0.3 / 0.8) < 0.07  # p(i2v | video sample)
    assert tasks["edit"] > 0 and tasks["t2i"] > tasks["edit"]  # 30 of 80 images are pairs, 80% of those edit
    t2v_only = ShardLatentSource(shards, "ds", _stage(tasks={"t2v": 1.0}), text, t_max=8)
    assert t2v_only.modalities == ("video",) and all(t == "t2v" for _ in range(5) for t in next(t2v_only).tasks)
    with pytest.raises(ValueError, match="visual_cond"):
        ShardLatentSource(shards, "ds", _stage(), text, visual_cond=False)


def test_ranks_read_disjoint_archives(shards: LocalStore, text: TextEncoders) -> None:
    index = read_index(shards, "ds")
    shard_of = dict(zip(index.column("sample_id").to_pylist(), index.column("shard").to_pylist()))
    videos = {sh for sh, m in zip(index.column("shard").to_pylist(), index.column("modality").to_pylist())
              if m == "video"}
    mine = []
    for rank in range(2):
        src = ShardLatentSource(shards, "ds", _stage(tasks={"t2v": 1.0}), text, t_max=8, rank=rank, world_size=2)
        stream = src.streams["video"]
        archives, seen = set(stream.loader.shards), []
        while True:  # one epoch of this rank's stream
            ids = next(src).ids
            if stream.epoch > 0:
                break
            seen += ids
        assert len(seen) == len(set(seen))  # each sample once per epoch
        assert {shard_of[i] for i in seen} == archives  # all of its archives, nothing else
        mine.append(archives)
    assert mine[0].isdisjoint(mine[1]) and mine[0] | mine[1] == videos and len(mine[0]) == len(mine[1])


def test_exact_resume_across_epochs(shards: LocalStore, text: TextEncoders) -> None:
    def batches(src: ShardLatentSource, n: int) -> list[tuple]:
        out = []
        for _ in range(n):
            b = next(src)
            out.append((b.ids, b.tasks, [x.clone() for x in b.x0], [e.clone() for e in b.text_embeds],
                        b.pooled.clone(), [c.clone() for c in b.condition]))
        return out

    stage = _stage()
    ref = batches(ShardLatentSource(shards, "ds", stage, text, t_max=8), 60)
    a = ShardLatentSource(shards, "ds", stage, text, t_max=8)
    head = batches(a, 23)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON (or torch.save) checkpoint
    b = ShardLatentSource(shards, "ds", stage, text, t_max=8)
    b.load_state_dict(state)
    tail = batches(b, 37)
    assert b.streams["image"].epoch >= 1  # the tail crossed an epoch boundary of the image stream
    for (ids, tasks, x, e, p, c), (rids, rtasks, rx, re, rp, rc) in zip(head + tail, ref):
        assert (ids, tasks) == (rids, rtasks)
        assert all(torch.equal(u, v) for u, v in zip(x + e + c, rx + re + rc)) and torch.equal(p, rp)


def test_trainer_packed_step_reports_tokens(shards: LocalStore, text: TextEncoders, one_thread: None) -> None:
    stage = _stage(uncond_prob=0.5)
    torch.manual_seed(0)
    model = CrossDiT("tiny")
    data = ShardLatentSource(shards, "ds", stage, text, t_max=8)
    trainer = Trainer(model, stage, data, data.null_condition())
    history = trainer.train(4)
    assert [h["tokens"] for h in history] and all(np.isfinite(h["loss"]) and h["tokens"] > 0 for h in history)
    assert trainer.step == 4 and data.index == 4
