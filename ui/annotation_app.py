"""Gradio SBS annotation app (report §8.2): per-annotator login, two phases, synchronised videos, shortcuts.

Run:
    python -m ui.annotation_app serve --db judgments.duckdb --plan plan.json --media-root MEDIA \
        [--credentials creds.txt] [--host 127.0.0.1] [--port 7860]
    python -m ui.annotation_app serve-demo K5_HOME/sbs/<comparison>  # demo logins, the comparison's own store
    python -m ui.annotation_app hash-password NAME < password.txt   # prints one credentials line

For a comparison materialized by ``sbs_batch``, ``--db`` is ``K5_HOME/sbs/<comparison>/judgments.duckdb``: the store
that the ``sbs_report`` asset scores, so what annotators enter here is what the report and the release gate see
(the app and the report take turns on the file; no need to stop the app).

Credentials file: one ``annotator:scrypt$n$r$p$salt_hex$hash_hex`` line per annotator (``#`` comments, blank lines
allowed); without ``--credentials`` the ``annotators`` table of the judgments DB is used. Passwords are never stored
in clear (scrypt, random 16-byte salt per user).

Identity comes only from the login session (``gr.Request.username``); the item to judge is derived on the server
from that annotator's own queue, and the store refuses judgments outside the annotator's assignments, so one
annotator can neither see nor write another one's items. Every button carries the (item, criterion) token the
annotator saw; a stale token (double key press, second tab) is refused instead of landing on the next criterion.

Keyboard: 1-6 options of the current criterion, U undo, Space play/pause both videos, arrows seek both by 1 s.
"""

from __future__ import annotations

import argparse
import html
import sys
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from evaluation.sbs.judgments_store import (
    AlreadyJudged,
    InvalidJudgment,
    JudgmentsStore,
    NotAssigned,
    Task,
    hash_password,
    options_for,
    verify_password,
)
from evaluation.sbs.sbs_plan import Plan, criteria_for
from evaluation.sbs.sbs_scores import CHOICE_LABELS, CRITERION_LABELS

MAX_OPTIONS = 6  # 5 options + "not applicable" for criterion 8

_DESCRIPTIONS = {
    "visual_1": "Framing, balance, and visual structure",
    "visual_2": "Realism and consistency of illumination",
    "visual_3": "Accuracy and harmony of color palette and contrast levels",
    "visual_4": "Clarity of foreground/background separation",
    "visual_5": "Temporal coherence between consecutive frames",
    "visual_6": "Energy, motion intensity, and scene activity",
    "visual_7": "Physical plausibility and naturalness of movement",
    "visual_8": "Temporal stability of facial features (mark not applicable when there are no faces)",
    "visual_9": "Holistic aesthetic quality",
    "visual_10": "Visual defects (distortions, glitches, blur): fewer is better",
    "visual_11": "Unintended transformations or content shifts: fewer is better",
    "pf_object_presence": "Number of unique objects from the prompt correctly generated",
    "pf_object_quantity": "Whether the correct number of each object is present",
    "pf_object_properties": "Accuracy of object attributes (color, size, shape)",
    "pf_object_placement": "Correct spatial relationships and relative positioning of objects",
    "pf_action_presence": "Number of unique actions from the prompt successfully realized",
    "pf_action_properties": "Accuracy in execution, timing, and dynamics of described actions",
}

# Runs once in the page head. Event delegation on document, because Gradio re-renders the HTML blocks.
_HEAD_JS = """
<script>
(function () {
  function vids() { return ['k5-left', 'k5-right'].map(function (i) { return document.getElementById(i); })
                      .filter(function (v) { return v && v.tagName === 'VIDEO'; }); }
  function toggle() {
    var v = vids(); if (!v.length) return;
    var play = v[0].paused;
    v.forEach(function (x) { x.currentTime = v[0].currentTime; if (play) { x.play(); } else { x.pause(); } });
  }
  function seekTo(t) { vids().forEach(function (x) { x.currentTime = Math.max(0, Math.min(t, x.duration || t)); }); }
  window.k5 = {toggle: toggle, seekTo: seekTo, vids: vids};
  document.addEventListener('click', function (e) { if (e.target.closest('#k5-play')) toggle(); });
  document.addEventListener('input', function (e) {
    if (e.target.id === 'k5-seek') {
      var v = vids(); if (v.length && v[0].duration) seekTo(e.target.value / 1000 * v[0].duration);
    }
  });
  document.addEventListener('keydown', function (e) {
    var t = e.target; var tag = (t && t.tagName) || '';
    if (tag === 'INPUT' || tag === 'TEXTAREA' || (t && t.isContentEditable) ||
        e.ctrlKey || e.metaKey || e.altKey) return;
    var btn = null;
    if (e.key >= '1' && e.key <= '6') btn = document.getElementById('k5-opt-' + (Number(e.key) - 1));
    else if (e.key === 'u' || e.key === 'U') btn = document.getElementById('k5-undo');
    else if (e.key === ' ') { e.preventDefault(); toggle(); return; }
    else if (e.key === 'ArrowRight' || e.key === 'ArrowLeft') {
      var v = vids(); if (v.length) seekTo(v[0].currentTime + (e.key === 'ArrowRight' ? 1 : -1)); return;
    }
    if (btn && btn.offsetParent !== null && !btn.disabled) { e.preventDefault(); btn.click(); }
  });
  // Keep the right video locked to the left one and the shared seek bar in step.
  setInterval(function () {
    var v = vids(); if (v.length < 2) return;
    var a = v[0], b = v[1];
    if (Math.abs(a.currentTime - b.currentTime) > 0.08) b.currentTime = a.currentTime;
    if (a.paused !== b.paused) { if (a.paused) b.pause(); else b.play(); }
    var s = document.getElementById('k5-seek');
    if (s && a.duration && document.activeElement !== s) s.value = Math.round(1000 * a.currentTime / a.duration);
  }, 100);
})();
</script>
"""


def _token(task: Task | None) -> str:
    return "" if task is None else f"{task.item_id}|{task.criterion}"


def _media_html(task: Task | None, media_root: Path) -> str:
    if task is None:
        return "<div id='k5-media'><p>All assigned pairs are done. Thank you!</p></div>"
    srcs = [f"/gradio_api/file={html.escape(str((media_root / p).resolve()))}" for p in (task.left, task.right)]
    if task.kind == "video":
        tags = [f"<video id='k5-{side}' src='{src}' muted playsinline loop preload='auto' "
                f"style='width:100%'></video>" for side, src in zip(("left", "right"), srcs)]
        controls = ("<div style='margin-top:6px'><button id='k5-play' type='button'>Play / pause both (Space)"
                    "</button> <input id='k5-seek' type='range' min='0' max='1000' value='0' style='width:60%'></div>")
    else:
        tags = [f"<img id='k5-{side}' src='{src}' style='width:100%'>" for side, src in zip(("left", "right"), srcs)]
        controls = ""
    cells = "".join(f"<div style='flex:1'><b>Model {k}</b><br>{t}</div>" for k, t in ((1, tags[0]), (2, tags[1])))
    return f"<div id='k5-media' data-item='{html.escape(task.item_id)}'><div style='display:flex;gap:12px'>{cells}" \
           f"</div>{controls}</div>"


def build_app(store: JudgmentsStore, plan: Plan | None, media_root: str | Path,
              auth: Callable[[str, str], bool]) -> gr.Blocks:
    """The annotation Blocks app. ``plan`` (if given) is loaded into the store; ``auth`` checks a login and is
    passed to ``launch`` by ``serve``. Media paths of the plan are relative to ``media_root``."""
    media_root = Path(media_root).resolve()
    if plan is not None:
        store.load_plan(plan)

    def view(user: str, status: str, old_item: str | None) -> list:
        task = store.next_task(user)
        if task is None:
            done, total = store.progress(user)
            header = f"**{html.escape(user)}** · {done}/{total} pairs done"
        else:
            visual, pf = criteria_for(task.kind)
            crits = visual if task.phase == 1 else pf
            phase = "Phase 1 — visual quality (prompt hidden)" if task.phase == 1 else "Phase 2 — prompt following"
            header = (f"**{html.escape(user)}** · pair {task.done + 1} of {task.total} · {phase} · "
                      f"criterion {crits.index(task.criterion) + 1} of {len(crits)}")
        prompt = gr.Markdown(value=f"**Prompt:** {html.escape(task.prompt)}" if task and task.phase == 2 else "",
                             visible=bool(task and task.phase == 2))
        # Re-rendering the media restarts playback, so only send it when the item changes.
        media = _media_html(task, media_root) if task is None or task.item_id != old_item else gr.skip()
        if task is None:
            crit_md, opts = "", []
        else:
            crit_md = f"### {CRITERION_LABELS[task.criterion]}\n{_DESCRIPTIONS[task.criterion]}"
            opts = list(options_for(task.criterion))
        buttons = [gr.Button(value=f"[{i + 1}] {CHOICE_LABELS[opts[i]]}", visible=True) if i < len(opts)
                   else gr.Button(visible=False) for i in range(MAX_OPTIONS)]
        return [header, prompt, media, crit_md, *buttons, _token(task), status]

    def user_of(request: gr.Request) -> str:
        user = getattr(request, "username", None)
        if not user:
            raise gr.Error("not logged in")
        return user

    def on_load(request: gr.Request) -> list:
        return view(user_of(request), "", None)

    def press(index: int, token: str, request: gr.Request) -> list:
        user = user_of(request)
        item_id, _, criterion = token.partition("|")
        current = store.next_task(user)
        if current is None or token != _token(current):
            # The screen was stale (double press, other tab): refresh instead of judging the wrong criterion.
            return view(user, "⚠ not saved: the page was out of date and has been refreshed", item_id)
        opts = options_for(criterion)
        if not 0 <= index < len(opts):
            return view(user, "⚠ not saved: no such option", item_id)
        try:
            store.record(user, item_id, criterion, opts[index])
        except (NotAssigned, InvalidJudgment, AlreadyJudged) as exc:
            return view(user, f"⚠ not saved: {exc}", item_id)
        return view(user, f"✓ saved: {CRITERION_LABELS[criterion]} = {CHOICE_LABELS[opts[index]]}", item_id)

    def undo(token: str, request: gr.Request) -> list:
        user = user_of(request)
        undone = store.undo_last(user)
        msg = "nothing to undo" if undone is None else (
            f"↶ undone: {CRITERION_LABELS[undone[2]]} of this pair" if undone[0] == "judgment" else "↶ skip undone")
        return view(user, msg, token.partition("|")[0] or None)

    def skip(reason: str, token: str, request: gr.Request) -> list:
        user = user_of(request)
        item_id = token.partition("|")[0]
        current = store.next_task(user)
        if current is None or current.item_id != item_id:
            return view(user, "⚠ not skipped: the page was out of date and has been refreshed", item_id)
        if not reason or not reason.strip():
            return view(user, "⚠ not skipped: give a reason", item_id)
        store.skip(user, item_id, reason)
        return view(user, "⏭ skipped", item_id)

    with gr.Blocks(title="K5 side-by-side annotation") as app:
        header = gr.Markdown(elem_id="k5-header")
        prompt = gr.Markdown(visible=False, elem_id="k5-prompt")
        media = gr.HTML(elem_id="k5-media-block")
        crit = gr.Markdown(elem_id="k5-criterion")
        with gr.Row():
            buttons = [gr.Button(visible=False, elem_id=f"k5-opt-{i}") for i in range(MAX_OPTIONS)]
        status = gr.Markdown(elem_id="k5-status")
        with gr.Row():
            undo_btn = gr.Button("[U] Undo last judgment", elem_id="k5-undo", variant="secondary")
            reason = gr.Textbox(label="Skip reason", placeholder="e.g. video does not load", elem_id="k5-skip-reason",
                                scale=3)
            skip_btn = gr.Button("Skip pair", elem_id="k5-skip")
        # Rendered but hidden: its value travels with every click, so the server knows what the annotator saw.
        token = gr.Textbox(visible="hidden", elem_id="k5-token")
        outputs = [header, prompt, media, crit, *buttons, token, status]
        app.load(on_load, inputs=None, outputs=outputs, api_name="view")
        for i, b in enumerate(buttons):
            b.click(_bind(press, i), inputs=[token], outputs=outputs, api_name=f"press_{i}")
        undo_btn.click(undo, inputs=[token], outputs=outputs, api_name="undo")
        skip_btn.click(skip, inputs=[reason, token], outputs=outputs, api_name="skip")
    app.k5_auth = auth  # picked up by serve()
    app.k5_media_root = media_root
    return app


def _bind(press: Callable[..., list], index: int) -> Callable[..., list]:
    # Gradio injects gr.Request by annotation, which a lambda cannot carry.
    def handler(token: str, request: gr.Request) -> list:
        return press(index, token, request)

    return handler


def file_auth(path: str | Path) -> Callable[[str, str], bool]:
    """Login check against a credentials file (format in the module docstring)."""
    table: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, hashed = line.partition(":")
            table[name.strip()] = hashed.strip()
    return lambda user, password: user in table and verify_password(password, table[user])


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Launch with login and access to the media folder only; returns the local URL."""
    # Many annotators submit at once; the store serialises the writes itself, so Gradio's queue need not.
    app.queue(default_concurrency_limit=32)
    _, url, _ = app.launch(server_name=host, server_port=port, auth=app.k5_auth, allowed_paths=[str(app.k5_media_root)],
                           prevent_thread_lock=not block, quiet=True, head=_HEAD_JS, ssr_mode=False,
                           footer_links=[],
                           auth_message="K5 side-by-side evaluation: log in with your annotator account")
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.annotation_app")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the annotation app")
    s.add_argument("--db", required=True, help="judgments DuckDB file (created if missing)")
    s.add_argument("--plan", help="annotation plan JSON (sbs_plan.Plan.to_json); loaded into the DB")
    s.add_argument("--media-root", required=True)
    s.add_argument("--credentials", help="credentials file; default: the DB's annotators table")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    d = sub.add_parser("serve-demo",
                       help="serve a materialized SBS batch folder (K5_HOME/sbs/<comparison>) on its judgments store, "
                       "with demo logins (every planned annotator, password 'demo'); used by `make ui`")
    d.add_argument("batch", help="folder written by the sbs_batch asset (plan.json, media/)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=7860)
    h = sub.add_parser("hash-password", help="read a password on stdin, print a credentials line")
    h.add_argument("name")
    args = parser.parse_args(argv)
    if args.cmd == "hash-password":
        password = sys.stdin.readline().rstrip("\n")
        print(f"{args.name}:{hash_password(password)}")
        return 0
    if args.cmd == "serve-demo":
        batch = Path(args.batch)
        if not (batch / "plan.json").exists():
            parser.error(f"{batch} has no plan.json; materialize an sbs_batch first (make demo)")
        plan = Plan.from_json((batch / "plan.json").read_text())
        # The comparison's one judgments store, which sbs_report scores: what is entered here reaches the report
        # (the demo's simulated votes live there too, under "simulated:*" names that nobody can log in as).
        store = JudgmentsStore(batch / "judgments.duckdb")
        names = sorted({a.annotator for a in plan.assignments})
        for name in names:
            if not store.check_password(name, "demo"):
                store.set_password(name, "demo")
        print(f"annotation app: log in as one of {', '.join(names)} with password 'demo'", flush=True)
        serve(build_app(store, plan, batch / "media", store.check_password), args.host, args.port, block=True)
        return 0
    store = JudgmentsStore(args.db)
    plan = Plan.from_json(Path(args.plan).read_text()) if args.plan else None
    auth = file_auth(args.credentials) if args.credentials else store.check_password
    app = build_app(store, plan, args.media_root, auth)
    serve(app, args.host, args.port, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
