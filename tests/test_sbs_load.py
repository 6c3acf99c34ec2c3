"""Smoke run of the load bench: 4 simulated annotators x 10 s against the real app; nothing may be lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real server / browser / generation: tens of seconds

REPO = Path(__file__).resolve().parents[1]


def test_load_smoke_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "bench.sbs_load", "--smoke", "--undo-rate", "0.1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["confirmed"] > 0 and result["stored"] == result["confirmed"] and result["lost"] == 0
    assert result["mismatched_annotators"] == {} and result["errors"] == 0 and result["app_alive_at_end"]
    assert result["latency_ms"]["p95"] > 0
