"""Browser test: the real app (``python -m ui.annotation_app serve``) on 127.0.0.1, driven by Playwright through
Debian's headless Chromium; judgments are then read back from the DuckDB file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest
from helpers import free_port

from evaluation.sbs.judgments_store import hash_password
from evaluation.sbs.sbs_demo import make_batch
from evaluation.sbs.sbs_plan import Assignment, Plan
from evaluation.sbs.sbs_scores import CHOICE_LABELS, CRITERION_LABELS, unswap_choice

pytestmark = pytest.mark.slow  # real server / browser / generation: tens of seconds

playwright_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORDS = {"ann1": "pw-one", "ann2": "pw-two", "ann3": "pw-three"}

# (criterion, key, on-screen choice). Keys index the report's option order shown on the buttons.
SEQUENCE = [
    ("visual_1", "1", "model1_better"), ("visual_2", "2", "model2_better"), ("visual_3", "3", "equally"),
    ("visual_4", "4", "model1_better_unconfident"), ("visual_5", "5", "model2_better_unconfident"),
    ("visual_6", "1", "model1_better"), ("visual_7", "2", "model2_better"), ("visual_8", "6", "not_applicable"),
    ("visual_9", "3", "equally"), ("visual_10", "3", "both_correct"), ("visual_11", "4", "equally"),
    ("pf_object_presence", "1", "model1_better"), ("pf_object_quantity", "2", "model2_better"),
    ("pf_object_properties", "3", "both_correct"), ("pf_object_placement", "4", "both_incorrect"),
    ("pf_action_presence", "5", "equally"), ("pf_action_properties", "3", "both_correct"),
]


def start_app(args: list[str]) -> tuple[subprocess.Popen, str]:
    """``python -m ui.annotation_app ARGS --port <free>`` as a real server; returns it and its URL once it answers."""
    port = free_port()
    # A file, not a pipe: nobody reads the server's output while it runs, and a full pipe would stall it.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "ui.annotation_app", *args, "--port", str(port)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.k5_log = log
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                proc.wait()
                log.seek(0)
                raise RuntimeError(f"app did not start: {log.read()}") from None
            time.sleep(0.5)


def stop_app(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    proc.k5_log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    assert os.path.exists(CHROMIUM), "Debian's chromium package is required (apt-get install -y chromium)"
    root = tmp_path_factory.mktemp("sbs_ui")
    media = root / "media"
    generated = make_batch(media, n_items=2, annotators=["x"], overlap=1, n_golden=0, frames=24)
    # p0 is shared by ann1 (A left) and ann2 (A right); p1 belongs to ann3 alone.
    plan = Plan(generated.items, [Assignment("ann1", "p0", True, 0), Assignment("ann2", "p0", False, 0),
                                  Assignment("ann3", "p1", True, 0)], overlap=2, seed=0)
    (root / "plan.json").write_text(plan.to_json())
    (root / "creds.txt").write_text("# annotator:scrypt hash\n"
                                    + "".join(f"{u}:{hash_password(p)}\n" for u, p in PASSWORDS.items()))
    db = root / "judgments.duckdb"
    proc, url = start_app(["serve", "--db", str(db), "--plan", str(root / "plan.json"), "--media-root", str(media),
                           "--credentials", str(root / "creds.txt")])
    info = {"url": url, "db": db, "proc": proc, "prompt_p0": plan.items[0].prompt}
    yield info
    stop_app(proc)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def login(browser, url: str, user: str, password: str):
    context = browser.new_context()  # a separate session (cookies) per annotator
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.locator("input[type=text]").first.fill(user)
    page.locator("input[type=password]").fill(password)
    page.locator("button", has_text="Login").first.click()
    page.wait_for_selector("#k5-media[data-item]")
    return page


def wait_status(page, text: str) -> None:
    page.wait_for_function("t => document.querySelector('#k5-status').innerText.includes(t)", arg=text)


def judge(page, key: str, criterion: str, choice: str) -> None:
    assert CRITERION_LABELS[criterion] in page.locator("#k5-criterion").inner_text()
    page.keyboard.press(key)
    wait_status(page, f"saved: {CRITERION_LABELS[criterion]} = {CHOICE_LABELS[choice]}")


def test_two_annotators_complete_both_phases_with_shortcuts(server, browser) -> None:
    url, prompt = server["url"], server["prompt_p0"]
    wrong = browser.new_context().new_page()
    wrong.goto(url)
    wrong.locator("input[type=text]").first.fill("ann1")
    wrong.locator("input[type=password]").fill("not-the-password")
    wrong.locator("button", has_text="Login").first.click()
    wrong.wait_for_timeout(1500)
    assert wrong.locator("#k5-media").count() == 0  # still on the login form

    for user in ("ann1", "ann2"):
        page = login(browser, url, user, PASSWORDS[user])
        assert "pair 1 of 1" in page.locator("#k5-header").inner_text()
        assert page.locator("#k5-media[data-item]").get_attribute("data-item") == "p0"
        if user == "ann1":
            # one control drives both videos: play, seek, pause
            page.wait_for_function("k5.vids().length == 2 && k5.vids().every(v => v.readyState >= 2)")
            page.keyboard.press("Space")
            page.wait_for_function("k5.vids().every(v => !v.paused)")
            page.evaluate("k5.seekTo(0.5)")
            page.wait_for_timeout(300)
            times = page.evaluate("k5.vids().map(v => v.currentTime)")
            assert abs(times[0] - times[1]) < 0.15 and times[0] >= 0.45
            page.click("#k5-play")
            page.wait_for_function("k5.vids().every(v => v.paused)")
        for n, (criterion, key, choice) in enumerate(SEQUENCE):
            phase2 = criterion.startswith("pf_")
            # phase 1 hides the prompt entirely; phase 2 shows it
            assert (prompt in page.locator("body").inner_text()) == phase2
            judge(page, key, criterion, choice)
            if user == "ann1" and n == 4:
                page.reload()  # resume where the annotator left off
                page.wait_for_selector("#k5-media[data-item]")
                assert "criterion 6 of 11" in page.locator("#k5-header").inner_text()
            if user == "ann1" and criterion == "visual_9":
                page.keyboard.press("u")  # undo the last judgment, then redo it
                wait_status(page, "undone: Overall Impression")
                judge(page, "3", criterion, choice)
        page.wait_for_function("document.querySelector('#k5-header').innerText.includes('1/1 pairs done')")
        page.context.close()

    # a second session of another annotator sees only its own pair and cannot write p0
    page = login(browser, url, "ann3", PASSWORDS["ann3"])
    assert page.locator("#k5-media[data-item]").get_attribute("data-item") == "p1"
    assert "p0_" not in page.content() and prompt not in page.content()
    page.evaluate("""() => { const el = document.querySelector('#k5-token textarea, #k5-token input');
        el.value = 'p0|visual_1'; el.dispatchEvent(new Event('input', {bubbles: true})); }""")
    page.keyboard.press("1")
    wait_status(page, "not saved")
    page.fill("#k5-skip-reason textarea, #k5-skip-reason input", "video does not load")
    page.click("#k5-skip")
    wait_status(page, "skipped")
    page.wait_for_function("document.querySelector('#k5-header').innerText.includes('1/1 pairs done')")
    page.context.close()

    stop_app(server["proc"])
    con = duckdb.connect(str(server["db"]), read_only=True)
    rows = con.execute("SELECT annotator, item_id, criterion, choice_screen, choice, a_on_left, created_at "
                       "FROM judgments ORDER BY seq").fetchall()
    skips = con.execute("SELECT annotator, item_id, reason FROM skips").fetchall()
    con.close()
    assert {r[0] for r in rows} == {"ann1", "ann2"}  # nothing from ann3
    assert skips == [("ann3", "p1", "video does not load")]
    expected = {c: ch for c, _, ch in SEQUENCE}
    for user, a_on_left in (("ann1", True), ("ann2", False)):
        mine = {r[2]: r for r in rows if r[0] == user}
        assert set(mine) == set(expected)  # exactly one row per criterion (the undone one replaced)
        for criterion, r in mine.items():
            assert r[1] == "p0" and r[3] == expected[criterion] and r[5] is a_on_left and r[6] is not None
            assert r[4] == unswap_choice(expected[criterion], a_on_left)
    assert next(r for r in rows if r[0] == "ann2" and r[2] == "visual_1")[4] == "model2_better"  # side swap
