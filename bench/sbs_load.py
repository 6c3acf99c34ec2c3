"""Load test of the SBS annotation app: N simulated annotators press answer buttons over HTTP (gradio_client, the
endpoints the browser's buttons call) while a login flood is switched on and off; reports p50/p95 submit latency with
and without the flood, then counts the judgments in DuckDB.

    python -m bench.sbs_load                  # 20 annotators, 3 x (quiet 20 s, flood 20 s), ~3 s between presses
    python -m bench.sbs_load --smoke          # 4 annotators, 1 x (quiet 8 s, flood 8 s) (runs in tests)
    python -m bench.sbs_load -n 20 --rounds 3 --window-s 20 --think-ms 3000 --flood-threads 8 --out load.json

The bench starts the app itself (``python -m ui.annotation_app serve`` on 127.0.0.1, a throw-away DB and
credentials file). Annotators log in first, then press answers for the whole run; the time is cut into windows,
quiet and flooded in turn (after a warm-up), so slow drifts of the machine's other load hit both sides alike. A
latency sample belongs to the window its request started in; the first ``settle`` seconds of each window are left
out (a flood that was just switched off still has checks queued). The flood (``bench.login_flood``) runs in its own
process (its client work does not slow the annotators' client threads): ``--flood-threads`` threads posting wrong
passwords to ``/login`` as fast as the server answers, for real annotator names and random ones, from
``--flood-clients`` forged addresses (X-Forwarded-For, which the app trusts from localhost as it would from a
reverse proxy); 1 is one guessing client, many is a distributed flood that per-client lockout cannot stop.

Pass: nothing lost (``count(*)`` in DuckDB == presses the app confirmed with "✓ saved", minus confirmed undos), no
flood login accepted, and flooded p95 <= ``--max-p95-ratio`` x quiet p95 (the issue's bound: 1.2). Prints one JSON
object (latencies in ms); the exit status is 0 only when all of that holds.
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
from ui.security import write_private_text

REPO = Path(__file__).resolve().parents[1]  # the app runs from here (python -m ui.annotation_app)


def _start_app(workdir: Path, n_annotators: int, n_items: int, seed: int) -> tuple[subprocess.Popen, str, dict]:
    annotators = {f"load{k:02d}": f"pw-{k}-{seed}" for k in range(n_annotators)}
    items = [PlanItem(f"p{k}", f"prompt {k}", f"p{k}_a.mp4", f"p{k}_b.mp4") for k in range(n_items)]
    plan = build_plan(items, list(annotators), overlap=min(5, n_annotators), seed=seed)
    (workdir / "plan.json").write_text(plan.to_json())
    write_private_text(workdir / "creds.txt", "".join(f"{u}:{hash_password(p)}\n" for u, p in annotators.items()))
    (workdir / "media").mkdir(exist_ok=True)  # no media files: no browser fetches them, only submits are measured
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
    """One simulated annotator: a logged-in client session pressing answers, ``think`` seconds apart on average."""

    def __init__(self, url: str, user: str, password: str, start: threading.Barrier, end: threading.Event,
                 think: float, undo_rate: float, seed: int) -> None:
        super().__init__(daemon=True)
        from gradio_client import Client

        self.user = user
        self.client = Client(url, auth=(user, password), verbose=False)
        self.start_barrier, self.end, self.think, self.undo_rate = start, end, think, undo_rate
        self.rng = random.Random(seed)
        self.confirmed = 0
        self.samples: list[tuple[float, float]] = []  # (request start, monotonic; latency s)
        self.errors: list[str] = []

    def run(self) -> None:
        token = self.client.predict(api_name="/view")[-3]  # outputs end with token, status, skip reason
        self.start_barrier.wait()
        while not self.end.is_set() and token:
            undo = self.confirmed > 0 and self.rng.random() < self.undo_rate
            choice = self.rng.choice(options_for(token.partition("|")[2]))
            t0 = time.perf_counter()
            started = time.monotonic()
            try:
                out = (self.client.predict(token, api_name="/undo") if undo
                       else self.client.predict(token, api_name=f"/choose_{CHOICE_KEYS[choice]}"))
            except Exception as exc:  # noqa: BLE001 -- an error is a result to report, not a crash of the bench
                self.errors.append(repr(exc)[:200])
                continue
            self.samples.append((started, time.perf_counter() - t0))
            status, token = out[-2], out[-3]
            if status.startswith("✓ saved"):
                self.confirmed += 1
            elif status.startswith("↶ undone:"):
                self.confirmed -= 1
            if self.think:
                time.sleep(self.rng.uniform(0.5, 1.5) * self.think)


def _percentiles(lat_ms: list[float]) -> dict | None:
    import numpy as np

    if not lat_ms:
        return None
    a = np.array(lat_ms)
    p50, p95 = (round(float(np.percentile(a, q)), 1) for q in (50, 95))
    return {"n": int(a.size), "p50": p50, "p95": p95, "max": round(float(a.max()), 1)}


def run(n_annotators: int, rounds: int, window_s: float, warmup_s: float, settle_s: float, think_ms: float,
        undo_rate: float, flood_threads: int, flood_clients: int, seed: int) -> dict:
    import duckdb

    duration = warmup_s + 2 * rounds * window_s
    with tempfile.TemporaryDirectory(prefix="sbs_load_") as tmp:
        workdir = Path(tmp)
        # enough items that nobody runs out of work: 17 presses per item, at most ~10 presses/s per annotator
        rate = 10.0 if think_ms <= 0 else min(10.0, 1000.0 / think_ms)
        n_items = max(20, int(duration * rate / 17 * n_annotators / min(5, n_annotators)) + 10)
        proc, url, annotators = _start_app(workdir, n_annotators, n_items, seed)
        flood = subprocess.Popen(
            [sys.executable, "-m", "bench.login_flood", url, "--names", ",".join(annotators), "--threads",
             str(flood_threads), "--clients", str(flood_clients), "--seed", str(seed)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def flood_cmd(cmd: str) -> None:
            flood.stdin.write(cmd + "\n")
            flood.stdin.flush()

        try:
            if flood.stdout.readline().strip() != "ready":
                raise RuntimeError("the flood process did not start")
            barrier, end = threading.Barrier(n_annotators + 1), threading.Event()
            sims = [Annotator(url, u, p, barrier, end, think_ms / 1000, undo_rate, seed + k)
                    for k, (u, p) in enumerate(annotators.items())]
            for s in sims:
                s.start()
            barrier.wait()
            t0 = time.monotonic()
            time.sleep(warmup_s)
            windows: list[tuple[str, float, float]] = []
            for _ in range(rounds):
                for kind in ("quiet", "flood"):
                    start = time.monotonic()
                    flood_cmd("on" if kind == "flood" else "off")
                    time.sleep(window_s)
                    windows.append((kind, start, time.monotonic()))
            flood_cmd("off")
            end.set()
            for s in sims:
                s.join(timeout=300)
            wall = time.monotonic() - t0
            flood_cmd("stop")
            flood_counts = json.loads(flood.stdout.readline())
            flood.wait(timeout=60)
            alive = proc.poll() is None
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        con = duckdb.connect(str(workdir / "judgments.duckdb"), read_only=True)
        per_user = dict(con.execute("SELECT annotator, count(*) FROM judgments GROUP BY annotator").fetchall())
        con.close()
    by_kind: dict[str, list[float]] = {"quiet": [], "flood": []}
    for s in sims:
        for started, latency in s.samples:
            for kind, w0, w1 in windows:
                if w0 + settle_s <= started < w1:
                    by_kind[kind].append(latency * 1000)
    quiet, flooded = _percentiles(by_kind["quiet"]), _percentiles(by_kind["flood"])
    confirmed = sum(s.confirmed for s in sims)
    mismatched = {s.user: [s.confirmed, per_user.get(s.user, 0)] for s in sims
                  if s.confirmed != per_user.get(s.user, 0)}
    flood_seconds = rounds * window_s
    return {
        "annotators": n_annotators, "rounds": rounds, "window_s": window_s, "warmup_s": warmup_s,
        "settle_s": settle_s, "think_ms": think_ms, "wall_s": round(wall, 1),
        "requests": sum(len(s.samples) for s in sims),
        "confirmed": confirmed, "stored": sum(per_user.values()), "lost": confirmed - sum(per_user.values()),
        "mismatched_annotators": mismatched,
        "errors": sum(len(s.errors) for s in sims), "error_samples": [e for s in sims for e in s.errors][:5],
        "latency_ms": {"quiet": quiet, "flood": flooded},
        "p95_ratio": round(flooded["p95"] / quiet["p95"], 3) if quiet and flooded else None,
        "p50_ratio": round(flooded["p50"] / quiet["p50"], 3) if quiet and flooded else None,
        "flood": {"threads": flood_threads, "clients": flood_clients, "responses": flood_counts,
                  "attempts_per_s": round(sum(flood_counts.values()) / flood_seconds, 1),
                  "accepted": flood_counts.get("200", 0)},
        "app_alive_at_end": alive,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--annotators", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="quiet/flood window pairs")
    ap.add_argument("--window-s", type=float, default=20.0, help="length of each quiet or flood window")
    ap.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured presses before the first window")
    ap.add_argument("--settle-s", type=float, default=5.0, help="start of each window left out of the figures")
    ap.add_argument("--think-ms", type=float, default=3000.0,
                    help="mean pause between presses (0: none); an annotator answers a question every few seconds")
    ap.add_argument("--undo-rate", type=float, default=0.03)
    ap.add_argument("--flood-threads", type=int, default=8)
    ap.add_argument("--flood-clients", type=int, default=1000, help="forged client addresses (1: one client)")
    ap.add_argument("--max-p95-ratio", type=float, default=1.2, help="pass bound on flooded p95 / quiet p95")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="4 annotators, 1 round of 8 s windows")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.annotators, args.rounds, args.window_s, args.warmup_s, args.settle_s = 4, 1, 8.0, 2.0, 2.0
        args.think_ms = min(args.think_ms, 200.0)
    result = run(args.annotators, args.rounds, args.window_s, args.warmup_s, args.settle_s, args.think_ms,
                 args.undo_rate, args.flood_threads, args.flood_clients, args.seed)
    result["max_p95_ratio"] = args.max_p95_ratio
    result["ok"] = bool(result["lost"] == 0 and not result["mismatched_annotators"] and result["app_alive_at_end"]
                        and result["confirmed"] > 0 and result["flood"]["accepted"] == 0
                        and result["p95_ratio"] is not None and result["p95_ratio"] <= args.max_p95_ratio)
    text = json.dumps(result, indent=2)
    print(text)
    q, f = result["latency_ms"]["quiet"], result["latency_ms"]["flood"]
    if q and f:
        print(f"submit latency, {args.annotators} annotators: quiet p50 {q['p50']:.0f} ms p95 {q['p95']:.0f} ms | "
              f"login flood ({result['flood']['attempts_per_s']}/s) p50 {f['p50']:.0f} ms p95 {f['p95']:.0f} ms | "
              f"p95 ratio {result['p95_ratio']:.2f} (bound {args.max_p95_ratio})", flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
