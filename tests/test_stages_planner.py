"""Table 4 stages checked against the report text itself, the §7.3 formulas against hand arithmetic, and the CLI."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from k5cli.train import plan_cmd, stages
from k5model.config import get_preset
from k5model.training.config import StageConfig
from k5model.training.planner import (
    GIB,
    S0,
    Candidate,
    block_params,
    memory_estimate,
    plan,
    reference_units,
    sequence_length,
    step_time_units,
)
from k5model.training.stages import CHAINS, TABLE4, TableStage, demo_scaling, get_table_stage, lineage

REPORT = Path("/work/shared/reference/kandinsky5_technical_report.txt")
ROW_START = re.compile(r"^(?P<label>[A-Za-z][^\d]*?)\s+(?P<steps>[\d.]+)k\s+(?P<batch>\d+)\s+(?P<lr>[\d.e+-]+)\s+"
                       r"(?P<wd>[\d.]+)\s+(?P<rest>.*)$")
RES = re.compile(r"(\d+)×\\times(\d+):\s*([\d.]+)")


def parse_table4() -> dict[str, dict]:
    """Rows of Table 4 as printed: label -> steps, batch, lr, wd, resolutions."""
    text = REPORT.read_text()
    start = text.index("Table 4: Parameters")
    end = re.compile(r"6\.4\s+Supervised Fine-tuning").search(text, start).start()
    block = text[start:end].splitlines()[4:]  # skip caption + 3 header lines
    rows: dict[str, dict] = {}
    current = None
    for line in block:
        m = ROW_START.match(line.strip())
        if m:
            current = {"label": m["label"].strip(), "steps": round(float(m["steps"]) * 1000), "batch": int(m["batch"]),
                       "lr": float(m["lr"]), "wd": float(m["wd"]), "res": {}}
            rows_line = m["rest"]
        elif current is not None and line.strip():
            first = RES.search(line)
            prefix = line[: first.start()].strip() if first else line.strip()
            if prefix:  # a continuation like "(MR, 5 seconds) 768×\times512: 0.47"
                current["label"] += " " + prefix
            rows_line = line
        else:
            continue
        for h, w, p in RES.findall(rows_line):
            current["res"][f"{h}x{w}"] = float(p)
        rows[current["label"]] = current  # re-keyed as the label grows; stale keys dropped below
    return {k: v for k, v in rows.items() if k == v["label"]}


@pytest.mark.skipif(not REPORT.exists(), reason="technical report text not available")
def test_every_table4_row_matches_the_report() -> None:
    rows = parse_table4()
    assert len(rows) == 14 == len(TABLE4)
    by_row = {s.row: s for s in TABLE4.values()}
    assert set(rows) == set(by_row)
    for label, r in rows.items():
        s = by_row[label]
        assert (s.steps, s.batch, s.lr, s.weight_decay) == (r["steps"], r["batch"], r["lr"], r["wd"]), label
        assert s.resolutions == r["res"], label


@pytest.mark.skipif(not REPORT.exists(), reason="technical report text not available")
def test_spot_values_from_report_lines() -> None:
    # Independent of the parser above: three literal rows of the report must still read as we encoded them.
    text = REPORT.read_text()
    for name, needle in (("video_lite_mr_5s", "Video Lite 50k 1331 3.0e-05 0.001"),
                         ("video_pro_hr_10s", "Video Pro 10k 333 2.0e-05 0.001"),
                         ("image_edit_hr", "Image Editing 110k 2000 2.0e-05 0.001")):
        assert needle in text
        s = get_table_stage(name)
        steps, batch, lr, wd = needle.split()[-4:]
        assert s.steps == float(steps[:-1]) * 1000 and s.batch == int(batch)
        assert s.lr == float(lr) and s.weight_decay == float(wd)


def test_probabilities_tasks_attention_and_lengths() -> None:
    for s in TABLE4.values():
        assert math.isclose(sum(s.resolutions.values()), 1.0, abs_tol=1e-9), s.name
        assert math.isclose(sum(s.tasks.values()), 1.0, abs_tol=1e-9), s.name
    assert get_table_stage("video_lite_mr_5s").tasks == {"t2i": 0.01, "t2v": 0.79, "i2v": 0.20}
    assert get_table_stage("video_pro_hr_5s").tasks == {"t2i": 0.02, "t2v": 0.77, "i2v": 0.21}
    assert get_table_stage("video_pro_t2i_lr").tasks == {"t2i": 1.0}
    assert get_table_stage("image_edit_mr").tasks == {"edit": 0.8, "t2i": 0.2}
    assert {n for n, s in TABLE4.items() if s.attention == "nabla"} == {
        "video_lite_mr_10s", "video_pro_hr_5s", "video_pro_hr_10s"}
    assert get_table_stage("video_lite_mr_10s").frames == 61  # 241 frames / 4 temporal + 1
    assert get_table_stage("video_pro_mr").frames == 31  # the 31 of S0
    assert get_table_stage("image_lite_hr").frames == 1


def test_chains_link_parents() -> None:
    assert sorted(n for chain in CHAINS.values() for n in chain) == sorted(TABLE4)
    for chain in CHAINS.values():
        assert TABLE4[chain[0]].parent is None
        for i, name in enumerate(chain[1:], 1):
            assert TABLE4[name].parent in chain[:i], name  # parent earlier in the same chain
    # Linear chains: each stage continues the previous one; the image editing branch starts at the shared MR stage.
    for key in ("video_lite", "video_pro"):
        assert [TABLE4[n].parent for n in CHAINS[key][1:]] == CHAINS[key][:-1]
    assert TABLE4["image_edit_mr"].parent == "image_lite_mr"
    assert lineage("image_edit_hr") == ["image_lite_lr", "image_lite_mr", "image_edit_mr", "image_edit_hr"]


def test_get_table_stage_error_lists_names() -> None:
    with pytest.raises(KeyError, match="video_pro_hr_10s"):
        get_table_stage("video_ultra")


def test_table_stage_rejects_bad_rows() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        TableStage("x", "x", "tiny", 1, 1, 1e-4, 0.0, {"256x256": 0.9}, {"t2i": 1.0}, 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        TableStage("x", "x", "tiny", 1, 1, 1e-4, 0.0, {"250x256": 1.0}, {"t2i": 1.0}, 0)


def test_full_scale_stage_config() -> None:
    cfg = get_table_stage("video_lite_mr_5s").to_stage_config()
    assert cfg.resolutions == {"64x64": 0.28, "64x96": 0.25, "96x64": 0.47}  # pixels / 8
    assert (cfg.frames, cfg.batch, cfg.model_preset, cfg.parent) == (31, 1331, "video_lite", "video_lite_lr")
    edit = get_table_stage("image_edit_mr").to_stage_config()
    assert (edit.tasks, edit.model_preset) == ({"edit": 0.8, "t2i": 0.2}, "image_lite_edit")


def test_demo_scaling_keeps_identity_and_trains_one_step() -> None:
    import torch

    from k5model.crossdit import CrossDiT
    from k5model.training.trainer import SyntheticLatentSource, Trainer

    for name in ("video_lite_mr_5s", "video_pro_hr_10s", "image_edit_mr"):
        table = get_table_stage(name)
        demo = demo_scaling(name, steps=1)
        assert isinstance(demo, StageConfig)
        preset = {"image_lite_edit": "tiny_image_edit"}.get(table.preset, "tiny")  # editing: condition channels
        assert (demo.name, demo.parent, demo.attention, demo.model_preset) == (name, table.parent, table.attention,
                                                                              preset)
        assert demo.lr == table.lr and demo.weight_decay == table.weight_decay
        torch.manual_seed(0)
        model = CrossDiT(get_preset(demo.model_preset, attention_type=demo.attention))
        cfg = model.config
        assert cfg.visual_cond  # video and editing models both have the condition + mask channels
        data = SyntheticLatentSource(demo, in_channels=cfg.in_visual_dim, text_dim=cfg.in_text_dim,
                                     pooled_dim=cfg.in_text_dim2, visual_cond=cfg.visual_cond)
        metrics = Trainer(model, demo, data, data.null_condition()).train(1)
        assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"]) and metrics[0]["lr"] == table.lr
    # relative sizes survive: 256x384 px -> 4x6, 512x768 px -> 8x12 latents
    assert demo_scaling("video_lite_lr").resolutions == pytest.approx({"4x4": 0.25, "4x6": 0.22, "6x4": 0.53})
    assert demo_scaling("video_lite_mr_10s").frames == 3 and demo_scaling("video_lite_mr_5s").frames == 2


# ---------------------------------------------------------------------------------------------------------------------
# Eq. 1 / Eq. 2 by hand


def test_step_time_eq1_by_hand() -> None:
    assert S0 == 3_047_424  # 256 * 384 * 31
    # reference point d = d0, S = S0: 1 * 1 * (9 + 14 + 6) * L * B = 29 * 32 * 1
    assert step_time_units(1792, S0, 32, 1) == pytest.approx(928)
    # 512x768 5 s: S/S0 = 4 -> 4 * (9 + 56 + 6) * 32 = 9088
    assert step_time_units(1792, 512 * 768 * 31, 32, 1) == pytest.approx(9088)
    assert reference_units() == pytest.approx(9088)
    # d = 2 d0, S = 2 S0, L = 10, B = 3: 2 * 2 * (9 + 28 + 12) * 30 = 5880
    assert step_time_units(3584, 2 * S0, 10, 3) == pytest.approx(5880)


def test_memory_eq2_by_hand() -> None:
    # L=2, d=4, d_t=3, d_f=8: P = 2 * (9*3*4 + 8*16 + 2*8*4) = 2 * (108 + 128 + 64) = 600
    assert block_params(2, 4, 3, 8) == 600
    # N=2, S=10: 12P/N = 3600; max(4P/N = 1200, 2*10*(2*4*1 + 18*4 + 2*8) = 20*96 = 1920) -> 5520
    assert memory_estimate(2, 4, 3, 8, 2, 10, offload=False) == 5520
    # offloaded (o = 0): 2*10*(0 + 72 + 16) = 1760 -> 3600 + 1760 = 5360
    assert memory_estimate(2, 4, 3, 8, 2, 10, offload=True) == 5360
    # N=1, S=1: 7200 + max(2400, 2*(8 + 72 + 16) = 192) -> 9600 (the gradient term wins)
    assert memory_estimate(2, 4, 3, 8, 1, 1, offload=False) == 9600
    # video_lite: P = 32 * (9*512*1792 + 8*1792^2 + 2*7168*1792) = 32 * 59,637,760 = 1,908,408,320
    cfg = get_preset("video_lite")
    assert block_params(cfg.num_visual_blocks, cfg.model_dim, cfg.time_dim, cfg.ff_dim) == 1_908_408_320


def test_plan_by_hand() -> None:
    one = TableStage("one", "one", "video_lite", 10, 4, 1e-4, 0.0, {"512x768": 1.0}, {"t2v": 1.0}, 5)
    assert sequence_length(512, 768, 31) == 31 * 32 * 48 == 47_616
    (row,) = plan(one, 2, [Candidate(2, 1)], ref_seconds=6.30)
    # accum = ceil(4 / (2 * 2)) = 1; Eq. 1 with B = 2: 2 * 9088 = 18176 units; 6.30 s per 9088 units -> 12.6 s
    assert (row.grad_accum, row.effective_batch) == (1, 4)
    assert row.step_units == pytest.approx(18_176) and row.step_seconds == pytest.approx(12.6)
    # Eq. 2 with S = 2 * 47,616 = 95,232 tokens, N = 1: 12P = 22,900,899,840; activations
    # 2 * 95,232 * (32*1792 + 18*1792 + 2*7168 = 103,936) = 19,796,066,304 > 4P = 7,633,633,280
    assert row.memory_gib * GIB == pytest.approx(22_900_899_840 + 19_796_066_304)
    assert row.fits  # 39.8 GiB
    # a t2i/t2v mix at 256x384: half the draws are one-frame images (S = S0 / 31)
    mix = TableStage("mix", "mix", "video_lite", 10, 3, 1e-4, 0.0, {"256x384": 1.0}, {"t2i": 0.5, "t2v": 0.5}, 5)
    (row,) = plan(mix, 1, [Candidate(1, 1)])
    img = (1 / 31) * (9 + 14 / 31 + 6) * 32  # d/d0 = 1, S/S0 = 1/31
    assert row.grad_accum == 3 and row.step_units == pytest.approx(3 * (0.5 * img + 0.5 * 928))
    assert row.step_seconds is None


def test_plan_default_candidates_and_fit() -> None:
    rows = plan("video_pro_hr_10s", 64)
    assert {r.candidate.shard_gpus for r in rows} == {1, 8, 64}
    fitting = [r for r in rows if r.fits]
    assert fitting and all(r.candidate.offload and r.candidate.batch_per_gpu == 1 for r in fitting)
    assert not any(r.fits for r in rows if r.candidate.shard_gpus == 1)  # 19B unsharded: 12P alone ~ 205 GiB
    with pytest.raises(ValueError):
        plan("video_lite_lr", 4, [Candidate(1, 8)])


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_stages_and_plan() -> None:
    runner = CliRunner()
    res = runner.invoke(stages, [])
    assert res.exit_code == 0, res.output
    for s in TABLE4.values():
        assert re.search(rf"^{s.name}\s.*\s{s.parent or '-'}$", res.output, re.M), s.name

    res = runner.invoke(plan_cmd, ["video_lite_mr_5s", "--gpus", "8", "--ref-seconds", "6.30", "--batch-per-gpu",
                                   "1", "--shard", "8"])
    assert res.exit_code == 0, res.output
    lines = [ln.split() for ln in res.output.splitlines() if re.match(r"^\s+1\s+8\s", ln)]
    assert [ln[2] for ln in lines] == ["no", "yes"]
    assert all(ln[3] == "167" and ln[4] == "1336" for ln in lines)  # ceil(1331 / 8) = 167, 167 * 8 = 1336
    expected = plan("video_lite_mr_5s", 8, [Candidate(1, 8)], ref_seconds=6.30)[0]
    assert float(lines[0][5]) == pytest.approx(expected.step_seconds, rel=1e-3)
    assert "step s" in res.output and "days" in res.output

    res = runner.invoke(plan_cmd, ["video_pro_hr_5s", "--gpus", "8"])
    assert res.exit_code == 0 and "step units" in res.output and "upper bound" in res.output

    res = runner.invoke(plan_cmd, ["nope", "--gpus", "1"])
    assert res.exit_code == 2 and "video_lite_mr_10s" in res.output
    res = runner.invoke(plan_cmd, ["video_lite_lr", "--gpus", "6", "--shard", "4"])
    assert res.exit_code == 2 and "divide" in res.output
