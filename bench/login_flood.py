"""A login flood against the annotation app, for ``bench.sbs_load``; a separate process so its client work does not
slow the annotators' client threads (imports only httpx, so it starts quickly).

    python -m bench.login_flood URL --names ann1,ann2 [--threads 8] [--clients 1000]

Reads commands on stdin, one per line: ``on`` / ``off`` switch the flood, ``stop`` (or end of input) ends it; prints
``ready`` once its threads run and, at the end, one JSON object {HTTP status or error class: count}. While on,
``--threads`` threads post wrong passwords to ``URL/login`` as fast as the server answers, for the given annotator
names and random ones, from ``--clients`` forged client addresses (X-Forwarded-For, which the app trusts from
localhost as it would from a reverse proxy; 1 is a single guessing client).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
from collections import Counter

import httpx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--names", required=True, help="comma-separated real annotator names (half the attempts)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = args.names.split(",")
    on, stop = threading.Event(), threading.Event()
    counts: Counter = Counter()
    lock = threading.Lock()

    def attack(k: int) -> None:
        rng = random.Random(args.seed * 1000 + k)
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                if not on.wait(timeout=0.2):
                    continue
                name = rng.choice(names) if rng.random() < 0.5 else f"guess{rng.randrange(10**9)}"
                n = rng.randrange(args.clients)
                try:
                    r = http.post(args.url.rstrip("/") + "/login",
                                  data={"username": name, "password": f"x{rng.random()}"},
                                  headers={"X-Forwarded-For": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"})
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                with lock:
                    counts[key] += 1

    workers = [threading.Thread(target=attack, args=(k,), daemon=True) for k in range(args.threads)]
    for w in workers:
        w.start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "on":
            on.set()
        elif cmd == "off":
            on.clear()
        elif cmd == "stop":
            break
    on.clear()
    stop.set()
    for w in workers:
        w.join(timeout=120)
    with lock:
        print(json.dumps(dict(counts)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
