"""Training core (issue 5): optimiser maths by hand, and an FSDP2 run on 2 gloo processes that is SIGKILLed and
resumed from its DCP checkpoint with losses identical, step for step, to an uninterrupted run."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import free_port, json_records, load_dcp, step_losses

from k5model.crossdit import CrossDiT
from k5model.training.checkpointing import latest_checkpoint
from k5model.training.config import OptimConfig, StageConfig, get_stage
from k5model.training.trainer import (
    EMA,
    SyntheticLatentSource,
    Trainer,
    build_optimizer,
    clip_gradients,
    warmup_lr,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# single-process maths against hand-computed values


def test_warmup_schedule_by_hand() -> None:
    assert [warmup_lr(s, 1e-3, 4) for s in (1, 2, 3, 4, 5, 100)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert warmup_lr(1, 0.5, 0) == 0.5


def test_ema_by_hand() -> None:
    lin = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    ema = EMA(lin, decay=0.9)
    assert ema.shadow["weight"].dtype == torch.float32  # fp32 shadow of a bf16 model
    for value, expected in ((4.0, 0.9 * 2.0 + 0.1 * 4.0), (0.0, 0.9 * 2.2)):  # 2.2, then 1.98
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update(lin)
        assert ema.shadow["weight"].item() == pytest.approx(expected, abs=1e-6)


def test_grad_clip_by_hand() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([0.0, 4.0])
    assert clip_gradients([a, b], max_norm=1.0) == pytest.approx(5.0)
    assert torch.allclose(a.grad, torch.tensor([0.6])) and torch.allclose(b.grad, torch.tensor([0.0, 0.8]))
    # below the threshold nothing changes
    assert clip_gradients([a, b], max_norm=10.0) == pytest.approx(1.0)
    assert torch.allclose(b.grad, torch.tensor([0.0, 0.8]))


def test_adamw_first_step_by_hand() -> None:
    p = nn.Parameter(torch.tensor([1.0]))
    opt = build_optimizer(nn.ParameterList([p]), OptimConfig(lr=0.1, weight_decay=0.1))
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
    p.grad = torch.tensor([0.5])
    opt.step()
    # decoupled decay 1·(1 - lr·wd) = 0.99, then the bias-corrected Adam step lr·g/(|g| + eps) ≈ 0.1
    assert p.item() == pytest.approx(0.99 - 0.1 * 0.5 / (0.5 + 1e-8), abs=1e-6)


def _trainer(**overrides) -> tuple[Trainer, SyntheticLatentSource]:
    stage = get_stage("tiny_demo", **overrides)
    torch.manual_seed(0)
    model = CrossDiT(stage.model_preset)
    data = SyntheticLatentSource(stage, text_dim=model.config.in_text_dim, pooled_dim=model.config.in_text_dim2)
    return Trainer(model, stage, data, data.null_condition()), data


def test_trainer_step_lr_ema_and_cfg_dropout() -> None:
    trainer, data = _trainer(uncond_prob=1.0)
    seen = []
    packed = trainer.model.forward_packed

    def record(*args, **kwargs):  # the trainer's one loss path runs forward_packed
        seen.append(kwargs["pooled_projections"])
        return packed(*args, **kwargs)

    trainer.model.forward_packed = record
    before = {n: s.clone() for n, s in trainer.ema.shadow.items()}
    m1 = trainer.train_step()
    assert m1["lr"] == pytest.approx(2.5e-4) and m1["uncond_frac"] == 1.0
    null = data.null_condition()
    assert torch.equal(seen[0], null.pooled.expand_as(seen[0]))  # every sample got the empty-prompt condition
    for n, p in trainer.model.named_parameters():
        assert torch.allclose(trainer.ema.shadow[n], 0.9 * before[n] + 0.1 * p.detach(), atol=1e-6), n
    assert trainer.train_step()["lr"] == pytest.approx(5e-4) and trainer.step == 2


def test_activation_checkpointing_changes_nothing() -> None:
    from k5model.training.parallel import AC_PREFIX, apply_activation_checkpointing

    plain, _ = _trainer()
    wrapped, _ = _trainer()
    apply_activation_checkpointing(wrapped.model)
    wrapped = Trainer(wrapped.model, wrapped.stage, wrapped.data, wrapped.null_condition)  # EMA of the wrapped model
    assert any(AC_PREFIX in n for n, _ in wrapped.model.named_parameters())
    assert wrapped.ema.shadow.keys() == plain.ema.shadow.keys()  # EMA keeps the plain CrossDiT names
    assert wrapped.model.state_dict().keys() == plain.model.state_dict().keys()
    for _ in range(2):
        assert wrapped.train_step()["loss"] == plain.train_step()["loss"]


def test_bf16_autocast_step_is_finite() -> None:
    trainer, _ = _trainer(bf16=True)
    assert torch.isfinite(torch.tensor(trainer.train_step()["loss"]))


def test_stage_config_validates() -> None:
    with pytest.raises(ValueError):
        StageConfig(name="x", steps=1, batch=1, lr=1e-4, tasks={"t2v": 0.5})
    with pytest.raises(ValueError):
        StageConfig(name="x", steps=1, batch=1, lr=1e-4, attention="flash")


def test_core_loop_imports_no_orchestration() -> None:
    code = ("import sys, k5cli.train_run; "
            "bad = [m for m in ('dagster', 'mlflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_single_process_save_prune_resave_and_load(tmp_path: Path) -> None:
    from k5model.training.checkpointing import load_checkpoint, save_checkpoint

    trainer, _ = _trainer()
    for _ in range(3):
        trainer.train_step()
        save_checkpoint(trainer, tmp_path, keep=2)
    save_checkpoint(trainer, tmp_path, keep=2)  # same step again: replaced, not duplicated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]
    expected = [trainer.train_step()["loss"] for _ in range(2)]
    fresh, data = _trainer()
    assert load_checkpoint(fresh, latest_checkpoint(tmp_path)) == 3 and data.index == 3
    assert [fresh.train_step()["loss"] for _ in range(2)] == expected


def test_latest_checkpoint_ignores_incomplete(tmp_path: Path) -> None:
    for name in ("step_4", "step_8.tmp", "step_12"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_4" / ".metadata").touch()
    (tmp_path / "step_8.tmp" / ".metadata").touch()  # killed mid-save: never renamed
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"  # step_12 has no .metadata either
    assert latest_checkpoint(tmp_path / "missing") is None


# --------------------------------------------------------------------------------------------------------------------
# 2 processes, FSDP2 + gloo, SIGKILL and resume


def _cmd(out: Path, *extra: str, steps: int = 12) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "k5cli.train_run", "--stage", "tiny_demo",
            "--out", str(out), "--steps", str(steps), "--ckpt-every", "4", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(out: Path, *extra: str, steps: int = 12) -> list[dict]:
    proc = subprocess.run(_cmd(out, *extra, steps=steps), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json_records(proc.stdout)


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc (torchrun starts each worker in its own session, so killing
    torchrun's process group alone would leave the workers training)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            out += [child, *_descendants(child)]
    return out


def _sigkill_tree(pid: int) -> None:
    victims = _descendants(pid)
    os.killpg(pid, signal.SIGKILL)  # torchrun (the group leader) first so it cannot restart workers
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_killed_at(step: int, cmd: list[str], step_sleep_s: float | None = None,
                   published: Path | None = None) -> dict[int, float]:
    """Start ``cmd``, read its JSON lines live and SIGKILL torchrun and its workers once ``step`` is logged (and
    ``published`` exists: an asynchronous save is complete); the losses it logged. ``step_sleep_s``: pause after each
    step (the kill lands before the next checkpoint)."""
    env = _env() if step_sleep_s is None else {**_env(), "K5_TRAIN_STEP_SLEEP_S": str(step_sleep_s)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)), daemon=True).start()
    killed_losses: dict[int, float] = {}
    deadline = time.monotonic() + 60
    try:
        while step not in killed_losses:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"victim run ended before step {step}"
            killed_losses.update(step_losses(json_records(line)))
        while published is not None and not published.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"{published} never appeared"
            time.sleep(0.02)
        _sigkill_tree(proc.pid)
    finally:
        if proc.poll() is None:
            _sigkill_tree(proc.pid)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return killed_losses


def _assert_same_checkpoint(a_dir: Path, b_dir: Path) -> None:
    """Model, EMA and AdamW state of two DCP checkpoints agree bit for bit."""
    a, b = load_dcp(a_dir), load_dcp(b_dir)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for key, state in a["optim"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["optim"]["state"][key][n]))
                   for n, v in state.items())


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    ref = _run(tmp_path / "ref")
    ref_losses = step_losses(ref)
    assert sorted(ref_losses) == list(range(1, 13))

    # The run to kill saves asynchronously: SIGKILL torchrun and its workers once step 6 is logged and step_4 was
    # published by the checkpoint thread (a later save may be in flight: its .tmp must not count).
    victim_out = tmp_path / "victim"
    killed_losses = _run_killed_at(6, _cmd(victim_out, "--no-export", "--activation-checkpointing",
                                           "--async-checkpoint"),
                                   step_sleep_s=0.3, published=victim_out / "checkpoints/step_4")
    latest = latest_checkpoint(victim_out / "checkpoints")
    assert latest is not None and latest.name in ("step_4", "step_8"), latest  # mid-run: step_12 never written
    resumed_step = int(latest.name.split("_")[1])
    for step, loss in killed_losses.items():  # before the kill the two runs agree too
        assert loss == ref_losses[step], step

    # The interrupted run also uses per-block activation checkpointing: recomputation must not change a single bit;
    # its checkpoints were saved asynchronously, those of the reference synchronously: the same state either way.
    resumed = _run(victim_out, "--resume", "--activation-checkpointing", "--async-checkpoint")
    stalls = [r["ckpt_stall_s"] for r in resumed if "ckpt_stall_s" in r]
    assert len(stalls) == (12 - resumed_step) // 4 and all(s >= 0 for s in stalls)  # the stall is logged per save
    assert resumed[0]["event"] == "start" and resumed[0]["resumed_from"] == resumed_step
    resumed_losses = step_losses(resumed)
    assert sorted(resumed_losses) == list(range(resumed_step + 1, 13))
    # Exact float equality: same world size, same ops in the same order, bitwise-restored fp32 state and data, and
    # per-step RNG keyed by (seed, rank, step) -> the arithmetic is identical, so no tolerance is needed.
    for step, loss in resumed_losses.items():
        assert loss == ref_losses[step], (step, loss, ref_losses[step])

    # Final sharded checkpoints agree bit for bit (model, AdamW moments, EMA).
    _assert_same_checkpoint(tmp_path / "ref/checkpoints/step_12", victim_out / "checkpoints/step_12")
    a = load_dcp(tmp_path / "ref/checkpoints/step_12")

    # EMA export: a diffusers transformer/ folder that CrossDiT.from_pretrained loads, holding exactly the EMA.
    exported = CrossDiT.from_pretrained(tmp_path / "ref/ema/transformer")
    state = exported.state_dict()
    assert state.keys() == a["ema"].keys()
    assert all(torch.equal(state[k], a["ema"][k]) for k in state)
    assert any(not torch.equal(state[k], a["model"][k]) for k in state)  # the EMA, not the raw weights


@pytest.mark.slow
def test_sequence_parallel_run_matches_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    """Ulysses over 2 gloo ranks (both ranks train the same batches, each on half of the tokens for one of the two
    heads): the losses of the one-process run to float rounding, and SIGKILL + resume repeats the run bit for bit."""
    ref = _run(tmp_path / "ref", "--no-export", "--sequence-parallel", "2", steps=8)
    assert ref[0]["mesh"] == {"dp": 1, "sp": 2} and ref[0]["world_size"] == 2
    ref_losses = step_losses(ref)
    one = subprocess.run([sys.executable, "-m", "k5cli.train_run", "--stage", "tiny_demo", "--out",
                          str(tmp_path / "one"), "--steps", "8", "--ckpt-every", "0", "--no-export"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=80)
    assert one.returncode == 0, one.stderr[-3000:]
    one_records = json_records(one.stdout)
    one_losses = step_losses(one_records)
    assert sorted(one_losses) == sorted(ref_losses) == list(range(1, 9))
    # the same samples (a batch is shared by the group, not split as data parallel would) ...
    assert [r["samples"] for r in ref if "loss" in r] == [r["samples"] for r in one_records if "loss" in r]
    for step, loss in one_losses.items():  # ... and the same maths up to the summation order of the gradients
        assert ref_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step

    victim_out = tmp_path / "victim"
    killed = _run_killed_at(6, _cmd(victim_out, "--no-export", "--sequence-parallel", "2", steps=8), step_sleep_s=1)
    assert latest_checkpoint(victim_out / "checkpoints").name == "step_4"
    assert all(loss == ref_losses[step] for step, loss in killed.items())
    resumed = _run(victim_out, "--no-export", "--sequence-parallel", "2", "--resume", steps=8)
    assert resumed[0]["resumed_from"] == 4 and resumed[0]["mesh"] == {"dp": 1, "sp": 2}
    resumed_losses = step_losses(resumed)
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    assert all(loss == ref_losses[step] for step, loss in resumed_losses.items())  # exact: same ranks, same ops
    _assert_same_checkpoint(tmp_path / "ref/checkpoints/step_8", victim_out / "checkpoints/step_8")
