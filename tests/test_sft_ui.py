"""The SFT annotation task in the app (report §4.6): a regular annotator and an expert drive the real server
(``python -m ui.sft_task serve``) through Stage 1 and Stage 2 in Debian's headless Chromium (Playwright); the answers
are then read back from the DuckDB store. Also: the task mounts into the SBS app through its ``extra_tasks`` hook."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port
from PIL import Image

from evaluation.sft.questionnaire import IMAGE_CRITERIA, STAGE1
from evaluation.sft.store import SftItem, SftStore

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORDS = {"reg": "screening-pw", "exp": "expert-pw"}
PASS_ITEM, FAIL_ITEM = "a_passes#0", "b_fails#0"


def make_sft_store(root: Path) -> SftStore:
    media = root / "media"
    media.mkdir(parents=True)
    store = SftStore(root / "judgments.duckdb")
    store.set_role("reg", "regular")
    store.set_role("exp", "expert")
    store.configure(stage1_overlap=1, stage1_min_yes=0.5, expert_overlap=1)
    items = []
    for k, item_id in enumerate((PASS_ITEM, FAIL_ITEM)):
        path = media / f"{k:02d}.png"
        Image.fromarray(np.full((48, 64, 3), 60 + 100 * k, np.uint8)).save(path)
        items.append(SftItem(item_id=item_id, kind="image", media_path=str(path), caption=f"a grey card {k}"))
    store.add_items(items)
    store.assign_screening()
    for user, password in PASSWORDS.items():
        store.set_password(user, password)
    return store


def test_sft_task_mounts_into_the_sbs_app(tmp_path: Path) -> None:
    from evaluation.sbs.judgments_store import JudgmentsStore
    from ui.annotation_app import build_app
    from ui.sft_task import sft_task

    sbs = JudgmentsStore(tmp_path / "sbs.duckdb")
    app = build_app(sbs, None, tmp_path, sbs.password_hash, extra_tasks=[sft_task(make_sft_store(tmp_path / "s"))])
    ids = {c.get("props", {}).get("elem_id") for c in app.config["components"]}
    assert {"k5-header", "k5sft-task", "k5sft-stage", "k5sft-opt-0", "k5sft-token"} <= ids
    names = {d.get("api_name") for d in app.config["dependencies"]}
    assert {"view", "sft_view", "sft_choose_0", "sft_undo"} <= names


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    assert os.path.exists(CHROMIUM), "Debian's chromium package is required (apt-get install -y chromium)"
    root = tmp_path_factory.mktemp("sft_ui")
    make_sft_store(root)
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: nobody reads it while the server runs
    proc = subprocess.Popen([sys.executable, "-m", "ui.sft_task", "serve", "--db", str(root / "judgments.duckdb"),
                             "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.seek(0)
                raise RuntimeError(f"SFT app did not start: {log.read()}") from None
            time.sleep(0.5)
    yield {"url": url, "root": root, "db": root / "judgments.duckdb"}
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def login(browser, url: str, user: str):
    page = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()  # one session per annotator
    page.set_default_timeout(30_000)
    page.goto(url)
    page.locator("input[type=text]").first.fill(user)
    page.locator("input[type=password]").fill(PASSWORDS[user])
    page.locator("button", has_text="Login").first.click()
    page.wait_for_function("() => { const h = document.querySelector('#k5sft-header');"
                           " return h && h.innerText.includes('·'); }")
    return page


def token(page) -> str:
    return page.evaluate("() => document.querySelector('#k5sft-token textarea, #k5sft-token input').value")


def answer(page, key: str, label: str) -> None:
    """Press ``key`` on the question ``label`` and wait until the page moved on (the token changes)."""
    assert label in page.locator("#k5sft-question").inner_text()
    before = token(page)
    page.keyboard.press(key)
    page.wait_for_function("t => document.querySelector('#k5sft-token textarea, #k5sft-token input').value !== t",
                           arg=before)
    assert "saved:" in page.locator("#k5sft-status").inner_text()


def visible_answers(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('[id^="k5sft-opt-"]')]
        .filter(b => b.offsetParent !== null).map(b => b.innerText.trim())""")


@pytest.mark.slow  # real server and browser: tens of seconds
def test_regular_and_expert_complete_both_stages(server) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        url = server["url"]
        expert = login(browser, url, "exp")  # before any screening: nothing reaches the expert
        assert "Stage 2" in expert.locator("#k5sft-header").inner_text()
        assert "Nothing to do here now" in expert.locator("#k5sft-media").inner_text()
        assert visible_answers(expert) == []

        regular = login(browser, url, "reg")
        header = regular.locator("#k5sft-header").inner_text()
        assert "Stage 1" in header and "item 1 of 2" in header and "question 1 of 4" in header
        assert visible_answers(regular) == ["[1] yes", "[2] no"]
        html_text = regular.content()
        for leak in (PASS_ITEM, FAIL_ITEM, str(server["root"]), "00.png", "file="):
            assert leak not in html_text, leak
        for q in STAGE1:  # first item: yes to every screening question
            answer(regular, "1", q.label)
        for q in STAGE1:  # second item: visible artifacts
            answer(regular, "2" if q.key == "no_artifacts" else "1", q.label)
        assert "Nothing to do here now" in regular.locator("#k5sft-media").inner_text()

        # a regular annotator cannot open Stage 2
        regular.get_by_label("Stage 2 — expert questionnaire").check()
        regular.wait_for_function("() => document.querySelector('#k5sft-header').innerText.includes('experts')")
        assert "Stage 2 is for experts" in regular.locator("#k5sft-header").inner_text()
        assert visible_answers(regular) == [] and regular.locator("#k5sft-item").count() == 0

        expert.reload()
        expert.wait_for_selector("#k5sft-item[data-item]")
        header = expert.locator("#k5sft-header").inner_text()
        assert "item 1 of 1" in header and "question 1 of 11" in header  # only the item that passed Stage 1
        src = expert.locator("#k5sft-image").get_attribute("src")
        assert src.startswith("/media/")
        assert expert.request.get(url.rstrip("/") + src).status == 200
        assert regular.request.get(url.rstrip("/") + src).status == 404  # media are granted per annotator
        assert "a grey card 0" in expert.locator("#k5sft-caption").inner_text()
        for q in IMAGE_CRITERIA:
            answer(expert, "1", q.label)
        expert.wait_for_selector("#k5sft-done")
        browser.close()

    store = SftStore(server["db"])
    answers = store.answers_frame()
    assert store.stage1_outcomes() == {PASS_ITEM: True, FAIL_ITEM: False}
    stage1, stage2 = answers[answers["stage"] == 1], answers[answers["stage"] == 2]
    assert len(stage1) == 8 and set(stage1["annotator"]) == {"reg"}
    assert set(stage1.loc[stage1["answer"] == "no", "item_id"]) == {FAIL_ITEM}
    assert len(stage2) == 11 and set(stage2["annotator"]) == {"exp"} and set(stage2["item_id"]) == {PASS_ITEM}
    assert store.assigned("exp", 2) == [PASS_ITEM]
