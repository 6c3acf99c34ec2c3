"""Browser test: the real app (``python -m ui.annotation_app serve``) on 127.0.0.1, driven by Playwright through
Debian's headless Chromium at a laptop's 1366x768; judgments are then read back from the DuckDB file.

Besides the annotation flow it checks what issue 20 found wrong with the annotator's screen and the app's exposure:
one meaning per shortcut key on every criterion, question and answers on screen in both phases, a repeated press
of a saved answer reported as saved, the skip box emptied after a skip, and media that only their annotator can
fetch from a page that names no side, golden pair or server path."""

from __future__ import annotations

import os
import shutil
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

from evaluation.sbs.sbs_demo import make_batch
from evaluation.sbs.sbs_plan import Assignment, Plan, PlanItem
from evaluation.sbs.sbs_scores import CHOICE_LABELS, CRITERION_LABELS, unswap_choice
from ui.annotation_app import CHOICE_KEYS

pytestmark = pytest.mark.slow  # real server / browser / generation: tens of seconds

playwright_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORDS = {"ann1": "pw-one", "ann2": "pw-two", "ann3": "pw-three"}
SCREEN = {"width": 1366, "height": 768}  # the annotators' laptops

# (criterion, on-screen choice); the key pressed is the choice's one key, CHOICE_KEYS[choice].
SEQUENCE = [
    ("visual_1", "model1_better"), ("visual_2", "model2_better"), ("visual_3", "equally"),
    ("visual_4", "model1_better_unconfident"), ("visual_5", "model2_better_unconfident"),
    ("visual_6", "model1_better"), ("visual_7", "model2_better"), ("visual_8", "not_applicable"),
    ("visual_9", "equally"), ("visual_10", "both_correct"), ("visual_11", "equally"),
    ("pf_object_presence", "model1_better"), ("pf_object_quantity", "model2_better"),
    ("pf_object_properties", "both_correct"), ("pf_object_placement", "both_incorrect"),
    ("pf_action_presence", "equally"), ("pf_action_properties", "both_correct"),
]
GOLDEN_ID = "cmp-golden0"  # named like sbs_batch names them, to show the page does not carry it


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
    shutil.copy(media / "p1_b.mp4", media / "golden0_degraded.mp4")
    golden = PlanItem(GOLDEN_ID, "a coloured square moving", "p1_a.mp4", "golden0_degraded.mp4", golden="degraded",
                      better="A")
    # p0 is shared by ann1 (A left) and ann2 (A right); ann3 has a golden pair, then p1.
    plan = Plan([*generated.items, golden],
                [Assignment("ann1", "p0", True, 0), Assignment("ann2", "p0", False, 0),
                 Assignment("ann3", GOLDEN_ID, True, 0), Assignment("ann3", "p1", True, 1)], overlap=2, seed=0)
    (root / "plan.json").write_text(plan.to_json())
    creds = root / "creds.txt"
    for user, password in PASSWORDS.items():  # the CLI writes the file owner-only
        subprocess.run([sys.executable, "-m", "ui.annotation_app", "hash-password", user, "--credentials", str(creds)],
                       input=password + "\n", text=True, check=True, cwd=REPO, capture_output=True)
    assert creds.stat().st_mode & 0o777 == 0o600
    db = root / "judgments.duckdb"
    proc, url = start_app(["serve", "--db", str(db), "--plan", str(root / "plan.json"), "--media-root", str(media),
                           "--credentials", str(creds)])
    info = {"url": url, "db": db, "proc": proc, "prompt_p0": plan.items[0].prompt, "media": media, "root": root}
    yield info
    stop_app(proc)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def login(browser, url: str, user: str, password: str):
    context = browser.new_context(viewport=SCREEN)  # a separate session (cookies) per annotator
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


def press_answer(page, key: str) -> None:
    """Press an answer key like a person: the page drops a second press of one key within 350 ms (a double press),
    so a repeated key waits until 400 ms have passed on the browser's own clock (a busy machine delays key events)."""
    page.wait_for_function("id => { const l = k5.lastAnswer(); return l.id !== id || Date.now() - l.at > 400; }",
                           arg=f"k5-key-{key}")
    page.keyboard.press(key)


def judge(page, key: str, criterion: str, choice: str) -> None:
    assert CRITERION_LABELS[criterion] in page.locator("#k5-criterion").inner_text()
    press_answer(page, key)
    wait_status(page, f"saved: {CRITERION_LABELS[criterion]} = {CHOICE_LABELS[choice]}")


def answer_buttons(page) -> dict[str, str]:
    """{key: label} of the answer buttons on screen."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[id^="k5-key-"]')]
        .filter(b => b.offsetParent !== null).map(b => [b.id.slice(7), b.innerText.trim()]))""")


def assert_fits_screen(page, phase2: bool) -> None:
    """The question and every answer button lie inside the 1366x768 viewport (and the prompt in phase 2)."""
    ids = ["#k5-criterion", *[f"#k5-key-{k}" for k in answer_buttons(page)]] + (["#k5-prompt"] if phase2 else [])
    for sel in ids:
        box = page.locator(sel).bounding_box()
        assert box is not None, sel
        assert box["y"] >= 0 and box["y"] + box["height"] <= SCREEN["height"], (sel, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= SCREEN["width"], (sel, box)


def assert_reveals_nothing(page, server: dict) -> None:
    """No side, golden flag, item id or server path in the page's HTML (and inline JS)."""
    text = page.content()
    for leak in ("_a.mp4", "_b.mp4", "golden", "degraded", str(server["root"]), str(REPO), "/tmp/", "file="):
        assert leak not in text, leak


def set_token(page, value: str) -> None:
    page.evaluate("""v => { const el = document.querySelector('#k5-token textarea, #k5-token input');
        el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }""", value)


def get_token(page) -> str:
    return page.evaluate("() => document.querySelector('#k5-token textarea, #k5-token input').value")


def test_two_annotators_complete_both_phases_with_shortcuts(server, browser) -> None:
    url, prompt = server["url"], server["prompt_p0"]
    wrong = browser.new_context().new_page()
    wrong.goto(url)
    wrong.locator("input[type=text]").first.fill("ann1")
    wrong.locator("input[type=password]").fill("not-the-password")
    with wrong.expect_response(lambda r: r.url.rstrip("/").endswith("/login")) as answer:
        wrong.locator("button", has_text="Login").first.click()
    assert answer.value.status == 400  # refused, and no session cookie was set
    assert not [c for c in wrong.context.cookies() if c["name"].startswith("access-token")]
    wrong.wait_for_timeout(500)
    assert wrong.locator("#k5-media").count() == 0  # still on the login form

    labels_by_key: dict[str, set[str]] = {}
    refs, media_src = {}, {}
    for user in ("ann1", "ann2"):
        page = login(browser, url, user, PASSWORDS[user])
        assert "pair 1 of 1" in page.locator("#k5-header").inner_text()
        refs[user] = page.locator("#k5-media[data-item]").get_attribute("data-item")
        media_src[user] = page.locator("#k5-left").get_attribute("src")
        assert_reveals_nothing(page, server)
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
        for n, (criterion, choice) in enumerate(SEQUENCE):
            phase2 = criterion.startswith("pf_")
            # phase 1 hides the prompt entirely; phase 2 shows it
            assert (prompt in page.locator("body").inner_text()) == phase2
            if n in (0, 11):
                assert_fits_screen(page, phase2)
            for key, label in answer_buttons(page).items():
                labels_by_key.setdefault(key, set()).add(label)
            if user == "ann2" and n == 0:
                # a real double click answers once: the second click is dropped, not applied to criterion 2
                page.dblclick(f"#k5-key-{CHOICE_KEYS[choice]}")
                wait_status(page, f"saved: {CRITERION_LABELS[criterion]} = {CHOICE_LABELS[choice]}")
                page.wait_for_timeout(800)
                assert "criterion 2 of 11" in page.locator("#k5-header").inner_text()
                continue
            stale = get_token(page)
            judge(page, CHOICE_KEYS[choice], criterion, choice)
            if user == "ann1" and n == 1:
                # a second press of the saved answer from the old screen says it is saved; another answer is refused
                set_token(page, stale)
                press_answer(page, CHOICE_KEYS[choice])
                wait_status(page, f"✓ already saved: {CRITERION_LABELS[criterion]} = {CHOICE_LABELS[choice]}")
                set_token(page, stale)
                press_answer(page, CHOICE_KEYS["model1_better"])
                wait_status(page, f"not changed: {CRITERION_LABELS[criterion]} was already saved as "
                            f"{CHOICE_LABELS[choice]}")
            if user == "ann1" and n == 4:
                page.reload()  # resume where the annotator left off
                page.wait_for_selector("#k5-media[data-item]")
                assert "criterion 6 of 11" in page.locator("#k5-header").inner_text()
            if user == "ann1" and criterion == "visual_9":
                page.keyboard.press("u")  # undo the last judgment, then redo it
                wait_status(page, "undone: Overall Impression")
                judge(page, CHOICE_KEYS[choice], criterion, choice)
        page.wait_for_function("document.querySelector('#k5-header').innerText.includes('1/1 pairs done')")
        page.context.close()
    # one key, one meaning, on all 17 criteria (key 3 is "Equally" wherever it is shown)
    assert all(len(labels) == 1 for labels in labels_by_key.values()), labels_by_key
    assert labels_by_key["3"] == {"[3] Equally"} and labels_by_key["6"] == {"[6] Both fully correct"}
    assert refs["ann1"] != refs["ann2"] and media_src["ann1"] != media_src["ann2"]  # per-annotator tokens

    page = login(browser, url, "ann3", PASSWORDS["ann3"])
    assert_reveals_nothing(page, server)
    assert "p0_" not in page.content() and prompt not in page.content()
    # media: another annotator's URL is a 404 like an unknown one; anonymous requests too; the owner's is served
    # without file metadata; Gradio's file route does not serve the media folder; unknown paths are 4xx
    assert page.request.get(url.rstrip("/") + media_src["ann1"]).status == 404
    own = page.request.get(url.rstrip("/") + page.locator("#k5-left").get_attribute("src"))
    assert own.status == 200 and own.headers["content-type"] == "video/mp4"
    assert "last-modified" not in own.headers and "etag" not in own.headers
    anonymous = browser.new_context()
    assert anonymous.request.get(url.rstrip("/") + media_src["ann1"]).status == 404
    anonymous.close()
    assert 400 <= page.request.get(f"{url}gradio_api/file={server['media'] / 'p0_a.mp4'}").status < 500
    assert page.request.get(f"{url}no/such/endpoint").status == 404
    # writing another annotator's pair with their token (or a raw item id) is refused
    for forged in (f"{refs['ann1']}|visual_1", "p0|visual_1"):
        set_token(page, forged)
        press_answer(page, "1")
        wait_status(page, "not saved")
        page.wait_for_timeout(400)
    box = "#k5-skip-reason textarea, #k5-skip-reason input"
    page.fill(box, "x" * 501)  # the box itself stops at the limit
    assert len(page.input_value(box)) == 500
    for reason in ("video does not load", "both clips are black"):
        page.fill(box, reason)
        page.click("#k5-skip")
        wait_status(page, "skipped")
        page.wait_for_function(f"() => document.querySelector('{box}').value === ''")  # cleared for the next pair
    page.wait_for_function("document.querySelector('#k5-header').innerText.includes('2/2 pairs done')")
    page.context.close()

    stop_app(server["proc"])
    assert server["db"].stat().st_mode & 0o777 == 0o600  # judgments and password hashes: owner-only
    con = duckdb.connect(str(server["db"]), read_only=True)
    rows = con.execute("SELECT annotator, item_id, criterion, choice_screen, choice, a_on_left, created_at "
                       "FROM judgments ORDER BY seq").fetchall()
    skips = con.execute("SELECT annotator, item_id, reason FROM skips ORDER BY seq").fetchall()
    con.close()
    assert {r[0] for r in rows} == {"ann1", "ann2"}  # nothing from ann3
    assert skips == [("ann3", GOLDEN_ID, "video does not load"), ("ann3", "p1", "both clips are black")]
    expected = dict(SEQUENCE)
    for user, a_on_left in (("ann1", True), ("ann2", False)):
        mine = {r[2]: r for r in rows if r[0] == user}
        assert set(mine) == set(expected)  # exactly one row per criterion (the undone one replaced)
        for criterion, r in mine.items():
            assert r[1] == "p0" and r[3] == expected[criterion] and r[5] is a_on_left and r[6] is not None
            assert r[4] == unswap_choice(expected[criterion], a_on_left)
    assert next(r for r in rows if r[0] == "ann2" and r[2] == "visual_1")[4] == "model2_better"  # side swap
