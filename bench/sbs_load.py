"""Load test of the SBS annotation app: N simulated annotators press option buttons concurrently for D seconds over
HTTP (gradio_client, the same endpoints the browser's buttons call), then the judgments in DuckDB are counted.

    python -m bench.sbs_load                 # 20 annotators x 120 s (the issue's acceptance run)
    python -m bench.sbs_load --smoke         # 4 annotators x 10 s (runs in tests)
    python -m bench.sbs_load -n 20 -d 120 --think-ms 300 --out load.json

The bench starts the app itself (``python -m ui.annotation_app serve`` on 127.0.0.1, a throw-away DB and
credentials file), because DuckDB lets only the app's process open the file; after the run it stops the app and
checks ``count(*) in DuckDB == judgments confirmed on screen`` (a press counts as confirmed only when the app
answered "✓ saved"; an undo that the app confirmed subtracts one). Media files are not generated: no browser
fetches them, and only the submit path is under test. Prints one JSON object (latencies in ms).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import free_port
from evaluation.sbs.judgments_store import hash_password, options_for
from evaluation.sbs.sbs_plan import PlanItem, build_plan
from ui.annotation_app import CHOICE_KEYS

REPO = Path(__file__).resolve().parents[1]  # the app runs from here (python -m ui.annotation_app)


def _start_app(workdir: Path, n_annotators: int, n_items: int, seed: int) -> tuple[subprocess.Popen, str, dict]:
    annotators = {f"load{k:02d}": f"pw-{k}-{seed}" for k in range(n_annotators)}
    items = [PlanItem(f"p{k}", f"prompt {k}", f"p{k}_a.mp4", f"p{k}_b.mp4") for k in range(n_items)]
    plan = build_plan(items, list(annotators), overlap=min(5, n_annotators), seed=seed)
    (workdir / "plan.json").write_text(plan.to_json())
    (workdir / "creds.txt").write_text("".join(f"{u}:{hash_password(p)}\n" for u, p in annotators.items()))
    (workdir / "media").mkdir(exist_ok=True)
    port = free_port()
    log = open(workdir / "app.log", "w")  # noqa: SIM115 -- lives as long as the app process
    proc = subprocess.Popen(
        [sys.executable, "-m", "ui.annotation_app", "serve", "--db", str(workdir / "judgments.duckdb"),
         "--plan", str(workdir / "plan.json"), "--media-root", str(workdir / "media"),
         "--credentials", str(workdir / "creds.txt"), "--port", str(port)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url, annotators
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError((workdir / "app.log").read_text()) from None
            time.sleep(0.5)


class Annotator(threading.Thread):
    """One simulated annotator: a logged-in client session pressing options as fast as ``think`` allows."""

    def __init__(self, url: str, user: str, password: str, start: threading.Barrier, duration: float,
                 think: float, undo_rate: float, seed: int) -> None:
        super().__init__(daemon=True)
        from gradio_client import Client

        self.user = user
        self.client = Client(url, auth=(user, password), verbose=False)
        self.start_barrier, self.duration, self.think, self.undo_rate = start, duration, think, undo_rate
        self.rng = random.Random(seed)
        self.confirmed = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        token = self.client.predict(api_name="/view")[-3]  # outputs end with token, status, skip reason
        self.start_barrier.wait()
        end = time.monotonic() + self.duration
        while time.monotonic() < end and token:
            undo = self.confirmed > 0 and self.rng.random() < self.undo_rate
            criterion = token.partition("|")[2]
            choice = self.rng.choice(options_for(criterion))
            t0 = time.perf_counter()
            try:
                out = (self.client.predict(token, api_name="/undo") if undo
                       else self.client.predict(token, api_name=f"/choose_{CHOICE_KEYS[choice]}"))
            except Exception as exc:  # noqa: BLE001 -- an error is a result to report, not a crash of the bench
                self.errors.append(repr(exc)[:200])
                continue
            self.latencies.append(time.perf_counter() - t0)
            status, token = out[-2], out[-3]
            if status.startswith("✓ saved"):
                self.confirmed += 1
            elif status.startswith("↶ undone:"):
                self.confirmed -= 1
            if self.think:
                time.sleep(self.rng.uniform(0.5, 1.5) * self.think)


def run(n_annotators: int, duration: float, think_ms: float, undo_rate: float, seed: int) -> dict:
    import duckdb
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="sbs_load_") as tmp:
        workdir = Path(tmp)
        # enough items that nobody runs out of work: ~17 presses per item, ~10 presses/s at most
        n_items = max(20, int(duration * 10 / 17 * n_annotators / min(5, n_annotators)) + 10)
        proc, url, annotators = _start_app(workdir, n_annotators, n_items, seed)
        try:
            barrier = threading.Barrier(n_annotators)
            sims = [Annotator(url, u, p, barrier, duration, think_ms / 1000, undo_rate, seed + k)
                    for k, (u, p) in enumerate(annotators.items())]
            t0 = time.monotonic()
            for s in sims:
                s.start()
            for s in sims:
                s.join(timeout=duration + 300)
            wall = time.monotonic() - t0
            alive = proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        con = duckdb.connect(str(workdir / "judgments.duckdb"), read_only=True)
        per_user = dict(con.execute("SELECT annotator, count(*) FROM judgments GROUP BY annotator").fetchall())
        con.close()
    lat = np.array([x for s in sims for x in s.latencies]) * 1000
    confirmed = sum(s.confirmed for s in sims)
    stored = sum(per_user.values())
    mismatched = {s.user: [s.confirmed, per_user.get(s.user, 0)] for s in sims
                  if s.confirmed != per_user.get(s.user, 0)}
    return {
        "annotators": n_annotators, "duration_s": duration, "wall_s": round(wall, 1), "think_ms": think_ms,
        "requests": int(lat.size), "throughput_rps": round(lat.size / wall, 1) if wall else None,
        "confirmed": confirmed, "stored": stored, "lost": confirmed - stored, "mismatched_annotators": mismatched,
        "errors": sum(len(s.errors) for s in sims), "error_samples": [e for s in sims for e in s.errors][:5],
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                       "p99": float(np.percentile(lat, 99)), "max": float(lat.max())} if lat.size else None,
        "app_alive_at_end": alive,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--annotators", type=int, default=20)
    ap.add_argument("-d", "--duration", type=float, default=120.0)
    ap.add_argument("--think-ms", type=float, default=0.0, help="mean pause between presses (0: as fast as possible)")
    ap.add_argument("--undo-rate", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="4 annotators x 10 s")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.annotators, args.duration = 4, 10.0
    result = run(args.annotators, args.duration, args.think_ms, args.undo_rate, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = (result["lost"] == 0 and not result["mismatched_annotators"] and result["app_alive_at_end"]
          and result["confirmed"] > 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
