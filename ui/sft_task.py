"""The SFT annotation task (report §4.6, Figure 8) in the annotation app: Stage 1 technical screening by regular
annotators, Stage 2 expert questionnaires on the items that passed it.

Run on its own (the store of the ``sft_judgments`` asset; logins from its ``annotators`` table):
    python -m ui.sft_task serve --db K5_HOME/sft/judgments.duckdb [--host 127.0.0.1] [--port 7861]
    python -m ui.sft_task serve-demo K5_HOME/sft   # demo logins: every account with an SFT role, password 'demo'
or beside the side-by-side task: ``ui.annotation_app.build_app(..., extra_tasks=[sft_task(store)])`` mounts it below
the SBS task on the same logins, login guard and private media route.

Everything an annotator may do is decided on the server from the login session: the item comes from the
annotator's own queue, the stage is refused unless the role allows it (``RoleRefused`` from the store: a regular
annotator cannot open Stage 2, whatever the page sends), experts only ever have items that passed Stage 1, and each
answer button carries the (item, stage, criterion) token the annotator saw, so a stale page is refreshed instead of
answering the wrong question. The page carries opaque tokens only (no item ids, no server paths).

Keyboard (when served on its own; beside SBS the SBS task keeps the keys): 1-3 answer the current question, U undoes
the last answer.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from evaluation.sbs.judgments_store import AlreadyJudged, InvalidJudgment, NotAssigned
from evaluation.sft.questionnaire import EXPERT, REGULAR, STAGE_EXPERT, STAGE_SCREENING, question
from evaluation.sft.store import RoleRefused, SftStore, SftTask
from ui.server import MEDIA_PREFIX, OpaqueRefs, user_of

MAX_OPTIONS = 3
STAGE_LABELS = {STAGE_SCREENING: "Stage 1 — technical screening", STAGE_EXPERT: "Stage 2 — expert questionnaire"}
_STAGE_OF = {v: k for k, v in STAGE_LABELS.items()}

# Installed once per page by a load event (works whichever app the task is mounted in).
_KEYS_JS = """
() => {
  if (window.k5sftKeys) return;
  window.k5sftKeys = true;
  document.addEventListener('keydown', function (e) {
    var t = e.target; var tag = (t && t.tagName) || '';
    if (tag === 'INPUT' || tag === 'TEXTAREA' || (t && t.isContentEditable) || e.ctrlKey || e.metaKey || e.altKey ||
        e.repeat) return;
    if (document.getElementById('k5-header')) return;  // mounted beside SBS: its keys own 1-9 and U there
    var btn = null;
    if (e.key >= '1' && e.key <= '3') btn = document.getElementById('k5sft-opt-' + (Number(e.key) - 1));
    else if (e.key === 'u' || e.key === 'U') btn = document.getElementById('k5sft-undo');
    if (btn && btn.offsetParent !== null && !btn.disabled) { e.preventDefault(); btn.click(); }
  });
}
"""


def _media_html(task: SftTask, src: str, ref: str) -> str:
    if task.kind == "video":
        tag = (f"<video id='k5sft-video' src='{src}' controls muted playsinline loop preload='auto' "
               "style='max-width:100%;max-height:45vh'></video>")
    else:
        tag = f"<img id='k5sft-image' src='{src}' alt='' style='max-width:100%;max-height:45vh'>"
    return f"<div id='k5sft-item' data-item='{html.escape(ref)}'>{tag}</div>"


def mount_sft_task(app: gr.Blocks, store: SftStore, media: OpaqueRefs) -> None:
    """Render the SFT task into ``app`` (call inside its ``with gr.Blocks()``); media are granted through ``media``
    (the app's ``MediaGrants``, whose route serves them to their annotator only)."""
    refs = OpaqueRefs()  # the page's stand-in for item ids

    def default_stage(user: str) -> int:
        return STAGE_EXPERT if store.role_of(user) == EXPERT else STAGE_SCREENING

    def view(user: str, stage: int, status: str) -> list:
        role = store.role_of(user)
        hidden = [gr.Button(visible=False) for _ in range(MAX_OPTIONS)]
        who = f"**{html.escape(user)}** ({role or 'no SFT role'}) · {STAGE_LABELS[stage]}"
        try:
            task = store.next_sft_task(user, stage)
        except RoleRefused as exc:
            return [f"{who} · ⛔ {html.escape(str(exc))}", "", "", "", *hidden, "", status]
        if task is None:
            done, total = store.sft_progress(user, stage)
            wait = " More items arrive as Stage 1 screening passes them." if stage == STAGE_EXPERT else ""
            return [f"{who} · {done}/{total} items done", f"<div id='k5sft-done'>Nothing to do here now.{wait}</div>",
                    "", "", *hidden, "", status]
        ref = refs.token(user, task.item_id, task.item_id)
        src = MEDIA_PREFIX + media.token(user, ("sft", task.item_id), Path(task.media_path))
        q = question(task.criterion)
        header = (f"{who} · item {task.done + 1} of {task.total} · question {task.index + 1} of {task.count}")
        caption = f"**Caption:** {html.escape(task.caption)}" if stage == STAGE_EXPERT and task.caption else ""
        buttons = [gr.Button(value=f"[{i + 1}] {q.options[i]}", visible=True) if i < len(q.options)
                   else gr.Button(visible=False) for i in range(MAX_OPTIONS)]
        return [header, _media_html(task, src, ref), caption, f"### {html.escape(q.label)}", *buttons,
                f"{ref}|{stage}|{task.criterion}", status]

    def on_load(request: gr.Request) -> list:
        user = user_of(request)
        stage = default_stage(user)
        return [STAGE_LABELS[stage], *view(user, stage, "")]

    def on_stage(label: str, request: gr.Request) -> list:
        return view(user_of(request), _STAGE_OF.get(label, STAGE_SCREENING), "")

    def choose(index: int, token: str, label: str, request: gr.Request) -> list:
        user = user_of(request)
        stage = _STAGE_OF.get(label, STAGE_SCREENING)
        ref, _, rest = token.partition("|")
        seen_stage, _, criterion = rest.partition("|")
        item_id = refs.value(user, ref) if ref else None
        try:
            current = store.next_sft_task(user, stage)
        except RoleRefused as exc:
            return view(user, stage, f"⚠ not saved: {exc}")
        if current is None or (current.item_id, str(current.stage), current.criterion) != (item_id, seen_stage,
                                                                                          criterion):
            return view(user, stage, "⚠ not saved: the page was out of date and has been refreshed")
        options = question(criterion).options
        if not 0 <= index < len(options):
            return view(user, stage, "⚠ not saved: no such answer")
        try:
            store.answer(user, item_id, stage, criterion, options[index])
        except (RoleRefused, NotAssigned, InvalidJudgment, AlreadyJudged) as exc:
            return view(user, stage, f"⚠ not saved: {exc}")
        return view(user, stage, f"✓ saved: {question(criterion).label} = {options[index]}")

    def undo(label: str, request: gr.Request) -> list:
        user = user_of(request)
        stage = _STAGE_OF.get(label, STAGE_SCREENING)
        try:
            undone = store.undo_last(user)
        except AlreadyJudged as exc:
            return view(user, stage, f"⚠ not undone: {exc}")
        return view(user, stage, "nothing to undo" if undone is None else f"↶ undone: {question(undone[2]).label}")

    with gr.Group(elem_id="k5sft-task"):
        gr.Markdown("## SFT dataset annotation")
        stage_radio = gr.Radio(list(STAGE_LABELS.values()), label="Stage", elem_id="k5sft-stage")
        header = gr.Markdown(elem_id="k5sft-header")
        item = gr.HTML(elem_id="k5sft-media")
        caption = gr.Markdown(elem_id="k5sft-caption")
        prompt = gr.Markdown(elem_id="k5sft-question")
        with gr.Row():
            buttons = [gr.Button(visible=False, elem_id=f"k5sft-opt-{i}") for i in range(MAX_OPTIONS)]
        status = gr.Markdown(elem_id="k5sft-status")
        undo_btn = gr.Button("[U] Undo last answer", elem_id="k5sft-undo", variant="secondary")
        token = gr.Textbox(visible="hidden", elem_id="k5sft-token")
    outputs = [header, item, caption, prompt, *buttons, token, status]
    app.load(on_load, inputs=None, outputs=[stage_radio, *outputs], api_name="sft_view")
    app.load(None, js=_KEYS_JS)
    stage_radio.input(on_stage, inputs=[stage_radio], outputs=outputs, api_name="sft_stage")
    for i, b in enumerate(buttons):
        b.click(_bind(choose, i), inputs=[token, stage_radio], outputs=outputs, api_name=f"sft_choose_{i}")
    undo_btn.click(undo, inputs=[stage_radio], outputs=outputs, api_name="sft_undo")


def _bind(choose: Callable[..., list], index: int) -> Callable[..., list]:
    # Gradio injects gr.Request by annotation, which a lambda cannot carry.
    def handler(token: str, label: str, request: gr.Request) -> list:
        return choose(index, token, label, request)

    return handler


def sft_task(store: SftStore) -> Callable[[gr.Blocks, OpaqueRefs], None]:
    """The hook ``ui.annotation_app.build_app(extra_tasks=[...])`` calls to mount this task beside SBS."""
    return lambda app, media: mount_sft_task(app, store, media)


def build_sft_app(store: SftStore, media_root: str | Path) -> gr.Blocks:
    """The SFT task on its own, with the annotation app's login guard (logins from the store's ``annotators``
    table) and private media route; serve it with ``ui.annotation_app.serve``."""
    from ui.security import LoginGuard
    from ui.server import MediaGrants

    media = MediaGrants(media_root)
    with gr.Blocks(title="K5 SFT annotation") as app:
        mount_sft_task(app, store, media)
    app.k5_guard = LoginGuard(store.password_hash)
    app.k5_media = media
    return app


def main(argv: list[str] | None = None) -> int:
    from ui.annotation_app import serve

    parser = argparse.ArgumentParser(prog="python -m ui.sft_task")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the SFT annotation app on a store")
    s.add_argument("--db", required=True, help="SFT judgments store (K5_HOME/sft/judgments.duckdb)")
    d = sub.add_parser("serve-demo", help="serve K5_HOME/sft with demo logins (every SFT account, password 'demo')")
    d.add_argument("folder", help="the sft_judgments asset's folder (judgments.duckdb, media/)")
    for p in (s, d):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=7861)
    args = parser.parse_args(argv)
    os.umask(0o077)  # the server writes answers and password hashes: owner-only files
    db = Path(args.db) if args.cmd == "serve" else Path(args.folder) / "judgments.duckdb"
    if not db.exists():
        parser.error(f"{db} does not exist; materialize sft_judgments (make demo) or run `k5 sft batch` first")
    store = SftStore(db)
    if args.cmd == "serve-demo":
        # Two human demo accounts beside the simulated ones: every item to screen, every passed item to rate.
        for name, role, stage in (("demo_screener", REGULAR, STAGE_SCREENING), ("demo_expert", EXPERT, STAGE_EXPERT)):
            store.set_role(name, role)
            store.add_to_queue(name, stage)
            if store.password_hash(name) is None:
                store.set_password(name, "demo")
        print("SFT annotation: log in as demo_screener (Stage 1) or demo_expert (Stage 2), password 'demo'", flush=True)
    serve(build_sft_app(store, db.parent / "media"), args.host, args.port, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
