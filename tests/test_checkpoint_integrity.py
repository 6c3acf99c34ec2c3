"""Issue 20, checkpoints: a SHA-256 per file written at save and verified at resume; a truncated or bit-flipped
latest checkpoint is skipped (and said so) and training resumes exactly from the previous one; expected failures of
``k5 train`` (damaged checkpoints with nothing to fall back to, missing or broken --init folders, a full disk) end in
one ``Error:`` line. Real files, real torch.distributed.checkpoint, real ``python -m`` processes (1 rank, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import json_records, step_losses

from k5model.crossdit import CrossDiT
from k5model.training.checkpointing import (
    CHECKSUMS,
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from k5model.training.config import get_stage
from k5model.training.trainer import SyntheticLatentSource, Trainer

REPO = Path(__file__).resolve().parents[1]


def _trainer() -> Trainer:
    stage = get_stage("tiny_demo")
    torch.manual_seed(0)
    model = CrossDiT(stage.model_preset)
    data = SyntheticLatentSource(stage, text_dim=model.config.in_text_dim, pooled_dim=model.config.in_text_dim2)
    return Trainer(model, stage, data, data.null_condition())


def _shard(step_dir: Path) -> Path:
    return max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip(path: Path) -> None:
    """Invert one byte in the middle of ``path`` (same size: only the checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checksums_detect_flips_and_truncation_and_fall_back(tmp_path: Path) -> None:
    trainer = _trainer()
    for _ in range(3):
        trainer.train_step()
        save_checkpoint(trainer, tmp_path, keep=3)
    step3 = tmp_path / "step_3"
    listed = json.loads((step3 / CHECKSUMS).read_text())["files"]
    assert set(listed) == {".metadata", "rank0.pt", _shard(step3).name}  # every file but the list itself
    assert verify_checkpoint(step3) is None and resumable_checkpoint(tmp_path).path == step3

    original = _shard(step3).read_bytes()
    _flip(_shard(step3))
    assert "fails its SHA-256 check" in verify_checkpoint(step3)
    with pytest.raises(CheckpointError, match="cannot be loaded: __0_0.distcp fails its SHA-256 check"):
        load_checkpoint(_trainer(), step3)
    _shard(step3).write_bytes(original)  # the same bytes again: verifies again, and loads
    assert verify_checkpoint(step3) is None and load_checkpoint(_trainer(), step3) == 3

    _flip(step3 / "rank0.pt")  # our own per-rank file is covered too
    _truncate(_shard(tmp_path / "step_2"))
    (tmp_path / "step_4.tmp").mkdir()  # killed mid-save: ignored, not reported
    point = resumable_checkpoint(tmp_path)
    assert point.path == tmp_path / "step_1"
    assert [name for name, _ in point.skipped] == ["step_3", "step_2"]
    assert "rank0.pt fails its SHA-256 check" in point.skipped[0][1]
    assert "truncated" in point.skipped[1][1]
    assert point.describe().endswith("resuming from step_1")

    (tmp_path / "step_1" / CHECKSUMS).unlink()  # nothing verifiable left
    point = resumable_checkpoint(tmp_path)
    assert point.path is None and "no checksums.json" in point.skipped[-1][1]
    assert resumable_checkpoint(tmp_path / "missing").path is None


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.train_step()
    save_checkpoint(trainer, tmp_path)
    trainer.train_step()
    # A real ENOSPC from the kernel: the next save's shard file is /dev/full (a device that is always full).
    full = tmp_path / "elsewhere"
    full.mkdir()
    (full / "__0_0.distcp").symlink_to("/dev/full")
    (tmp_path / "step_2.tmp").symlink_to(full)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoints are intact") as err:
        save_checkpoint(trainer, tmp_path)
    assert err.value.errno == 28
    assert not (tmp_path / "step_2").exists() and resumable_checkpoint(tmp_path).path == tmp_path / "step_1"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "k5cli.train_run", "--stage", "tiny_demo", "--out", str(out), "--steps", "12",
           "--ckpt-every", "4", "--keep", "3", "--no-export", *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _k5_train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "k5cli.main", "train", "--stage", "tiny_demo", "--out", str(out), "--steps", "12",
           "--ckpt-every", "4", "--no-export", *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _one_error_line(stderr: str) -> str:
    """The one ``Error:`` line (library warnings and the progress bar may precede it; a traceback may not)."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_corrupted_latest_checkpoints_fall_back_and_resume_exactly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _train_run(out)
    assert first.returncode == 0, first.stderr[-3000:]
    ref = step_losses(json_records(first.stdout))
    assert sorted(ref) == list(range(1, 13))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_12", "step_4", "step_8"]
    _flip(_shard(ckpts / "step_12"))  # a flipped block: DCP alone would load it silently
    _truncate(_shard(ckpts / "step_8"))  # a truncated shard: DCP alone would fail with a traceback

    resumed = _train_run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = json_records(resumed.stdout)
    start = records[0]
    assert start["event"] == "start" and start["resumed_from"] == 4
    assert [s["checkpoint"] for s in start["skipped_checkpoints"]] == ["step_12", "step_8"]
    assert "SHA-256" in start["skipped_checkpoints"][0]["reason"]
    assert "truncated" in start["skipped_checkpoints"][1]["reason"]
    assert "resume: skipped step_12" in resumed.stderr and "resuming from step_4" in resumed.stderr
    losses = step_losses(records)
    assert sorted(losses) == list(range(5, 13))
    for step, loss in losses.items():  # exactly the uninterrupted run's numbers from the fallback on
        assert loss == ref[step], (step, loss, ref[step])
    assert all(verify_checkpoint(ckpts / f"step_{n}") is None for n in (4, 8, 12))  # damaged ones re-saved whole

    # Every checkpoint damaged: nothing to fall back to -> one Error line naming each and what to do.
    for n in (4, 8, 12):
        _flip(_shard(ckpts / f"step_{n}"))
    failed = _k5_train(out, "--resume")
    assert failed.returncode != 0
    err = _one_error_line(failed.stderr)
    assert "no checkpoint in" in err and "skipped step_4" in err and "move the damaged step_* folders aside" in err


def test_missing_and_broken_init_folders_are_one_error_line(tmp_path: Path) -> None:
    missing = _k5_train(tmp_path / "a", "--init", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "--init" in _one_error_line(missing.stderr)
    assert "no such file or folder" in missing.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"in_visual_dim": ')  # cut off mid-write
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 16)
    res = _k5_train(tmp_path / "b", "--init", str(broken))
    assert res.returncode != 0
    err = _one_error_line(res.stderr)
    assert f"--init {broken}: cannot initialise" in err and "pass the parent stage's exported" in err
    missing_text = _k5_train(tmp_path / "c", "--text-encoders", str(tmp_path / "no_pipeline"))
    assert missing_text.returncode != 0 and "--text-encoders" in _one_error_line(missing_text.stderr)


def test_disk_full_during_k5_train_is_one_error_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    full = tmp_path / "elsewhere"
    full.mkdir()
    (full / "__0_0.distcp").symlink_to("/dev/full")  # the first checkpoint's shard lands on an always-full device
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_4.tmp").symlink_to(full)
    res = _k5_train(out, "--steps", "4")
    assert res.returncode != 0
    err = _one_error_line(res.stderr)
    assert "could not write checkpoint step_4" in err and "No space left on device" in err
    assert "free disk space" in err and not (out / "checkpoints" / "step_4").exists()



def _folder(root: Path, name: str, text: str) -> Path:
    (root / name).mkdir()
    (root / name / "model_index.json").write_text(text)
    return root / name


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
def test_replace_dir_publishes_whole_folders(swap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``replace_dir`` leaves the previous folder or the new one at ``out`` and nothing else behind, through the
    one-step swap and through the two-rename fallback (used where the kernel cannot swap)."""
    from k5model import checkpoint

    if swap == "fallback":
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    out = tmp_path / "pipeline"
    checkpoint.replace_dir(_folder(tmp_path, "a", "v1"), out)
    assert (out / "model_index.json").read_text() == "v1"
    checkpoint.replace_dir(_folder(tmp_path, "b", "v2"), out)
    assert (out / "model_index.json").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path) -> None:
    from k5model.checkpoint import _exchange

    a, b = _folder(tmp_path, "a", "A"), _folder(tmp_path, "b", "B")
    if not _exchange(a, b):
        pytest.skip("this kernel or file system has no renameat2(RENAME_EXCHANGE); replace_dir uses its fallback")
    assert (a / "model_index.json").read_text() == "B" and (b / "model_index.json").read_text() == "A"


def test_replace_dir_restores_a_folder_a_crash_left_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the fallback's two renames leaves ``.<name>.old`` and no ``out``; the next publish puts the
    last good folder back before it swaps, so a failure of that publish still leaves the previous folder visible."""
    from k5model import checkpoint

    out = tmp_path / "pipeline"
    _folder(tmp_path, ".pipeline.old", "v1")
    missing = tmp_path / "never-built"
    with pytest.raises(FileNotFoundError):
        checkpoint.replace_dir(missing, out)
    assert (out / "model_index.json").read_text() == "v1" and not (tmp_path / ".pipeline.old").exists()
