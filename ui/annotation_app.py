"""Gradio SBS annotation app (report §8.2): per-annotator login, two phases, synchronised videos, shortcuts.

Run:
    python -m ui.annotation_app serve --db judgments.duckdb --plan plan.json --media-root MEDIA \
        [--credentials creds.txt] [--host 127.0.0.1] [--port 7860]
    python -m ui.annotation_app serve-demo K5_HOME/sbs/<comparison>  # demo logins, the comparison's own store
    python -m ui.annotation_app hash-password NAME < password.txt   # prints one credentials line
    python -m ui.annotation_app hash-password NAME --credentials creds.txt < password.txt  # adds/replaces it (0600)

For a comparison materialized by ``sbs_batch``, ``--db`` is ``K5_HOME/sbs/<comparison>/judgments.duckdb``: the store
that the ``sbs_report`` asset scores, so what annotators enter here is what the report and the release gate see
(the app and the report take turns on the file; no need to stop the app).

Credentials file: one ``annotator:scrypt$n$r$p$salt_hex$hash_hex`` line per annotator (``#`` comments, blank lines
allowed); without ``--credentials`` the ``annotators`` table of the judgments DB is used. Passwords are never stored
in clear (scrypt, random 16-byte salt per user). Logins go through ``ui.security.LoginGuard`` (lockout per name and
per client address, scrypt off the event loop, the same work and answer time for unknown names); the server process
creates its files owner-only (umask 077).

Identity comes only from the login session (``gr.Request.username``); the item to judge is derived on the server
from that annotator's own queue, and the store refuses judgments outside the annotator's assignments, so one
annotator can neither see nor write another one's items. Every button carries the (item, criterion) token the
annotator saw; a stale token (double key press, second tab) is refused instead of landing on the next criterion,
and a repeated press of a choice already saved says so. The page carries only opaque per-annotator tokens
(``ui.server.OpaqueRefs``): no item id, no model side, no golden flag, no server path; media come from
``/media/<token>``, served only to the annotator it was issued to.

Keyboard: every answer has one key on every criterion (``CHOICE_KEYS``: 1 model 1 better, 2 model 2 better,
3 equally, 4/5 model 1/2 better (unconfident), 6 both fully correct, 7 both fully incorrect, 0 not applicable),
U undo, Space play/pause both videos, arrows seek both by 1 s.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import gradio as gr

from evaluation.sbs.judgments_store import (
    MAX_REASON_CHARS,
    AlreadyJudged,
    InvalidJudgment,
    JudgmentsStore,
    NotAssigned,
    Task,
    hash_password,
    options_for,
)
from evaluation.sbs.sbs_plan import Plan, criteria_for
from evaluation.sbs.sbs_scores import ALL_CHOICES, CHOICE_LABELS, CRITERION_LABELS, NA
from ui.security import LoginGuard, LoginPolicy, PasswordLookup, password_lookup_from_file, write_private_text
from ui.server import MediaGrants, OpaqueRefs, build_server, run_server, user_of

# One key per answer, the same on every criterion (an option a criterion does not offer is simply not shown).
CHOICE_KEYS: dict[str, str] = {choice: str(k) for k, choice in enumerate(ALL_CHOICES, start=1)} | {NA: "0"}
MAX_TOKEN_CHARS = 200  # the hidden (item, criterion) token; anything longer is not one we issued

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
  // A double click (or a double key press) must not answer the next criterion with the same choice: a second
  // press of the same answer within 350 ms is dropped before Gradio sees it (capture phase, above its listeners).
  var lastAnswer = {id: '', at: 0};
  window.k5.lastAnswer = function () { return lastAnswer; };  // the accepted press: (button id, Date.now())
  document.addEventListener('click', function (e) {
    var b = e.target.closest('[id^="k5-key-"]'); if (!b) return;
    var now = Date.now();
    if (b.id === lastAnswer.id && now - lastAnswer.at < 350) { e.stopPropagation(); e.preventDefault(); return; }
    lastAnswer = {id: b.id, at: now};
  }, true);
  document.addEventListener('input', function (e) {
    if (e.target.id === 'k5-seek') {
      var v = vids(); if (v.length && v[0].duration) seekTo(e.target.value / 1000 * v[0].duration);
    }
  });
  document.addEventListener('keydown', function (e) {
    var t = e.target; var tag = (t && t.tagName) || '';
    if (tag === 'INPUT' || tag === 'TEXTAREA' || (t && t.isContentEditable) ||
        e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    var btn = null;
    if (e.key >= '0' && e.key <= '9') btn = document.getElementById('k5-key-' + e.key);
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

# Compact enough that media, question and answers fit a 1366x768 laptop screen in both phases.
_CSS = """
.gradio-container { padding-top: 4px !important; padding-bottom: 4px !important; }
#k5-header p, #k5-prompt p, #k5-status p { margin: 0; }
#k5-media video, #k5-media img { width: 100%; height: 34vh; object-fit: contain; background: #111; display: block; }
#k5-criterion h3 { margin: 0 0 2px 0; }
#k5-criterion p { margin: 0; }
#k5-answers button { min-width: 0; }
"""


def _token(item_ref: str, task: Task | None) -> str:
    return "" if task is None else f"{item_ref}|{task.criterion}"


def _media_html(task: Task | None, item_ref: str, srcs: tuple[str, str]) -> str:
    if task is None:
        return "<div id='k5-media'><p>All assigned pairs are done. Thank you!</p></div>"
    if task.kind == "video":
        tags = [f"<video id='k5-{side}' src='{src}' muted playsinline loop preload='auto'></video>"
                for side, src in zip(("left", "right"), srcs)]
        controls = ("<div style='margin-top:4px'><button id='k5-play' type='button'>Play / pause both (Space)"
                    "</button> <input id='k5-seek' type='range' min='0' max='1000' value='0' style='width:60%'></div>")
    else:
        tags = [f"<img id='k5-{side}' src='{src}' alt=''>" for side, src in zip(("left", "right"), srcs)]
        controls = ""
    cells = "".join(f"<div style='flex:1'><b>Model {k}</b><br>{t}</div>" for k, t in ((1, tags[0]), (2, tags[1])))
    return (f"<div id='k5-media' data-item='{html.escape(item_ref)}'><div style='display:flex;gap:12px'>{cells}"
            f"</div>{controls}</div>")


def _choice_button(choice: str) -> str:
    return f"[{CHOICE_KEYS[choice]}] {CHOICE_LABELS[choice]}"


def build_app(store: JudgmentsStore, plan: Plan | None, media_root: str | Path,
              password_lookup: PasswordLookup, login_policy: LoginPolicy | None = None,
              extra_tasks: Sequence[Callable[[gr.Blocks, MediaGrants], None]] = ()) -> gr.Blocks:
    """The annotation Blocks app. ``plan`` (if given) is loaded into the store; ``password_lookup(name)`` gives a
    stored scrypt line (None for unknown names) and backs the login guard ``serve`` installs. Media paths of the
    plan are relative to ``media_root`` and reach the page only as opaque ``/media/<token>`` URLs."""
    media = MediaGrants(media_root)
    items = OpaqueRefs()  # the page's stand-in for item ids (which name golden pairs)
    if plan is not None:
        store.load_plan(plan)
    choices = list(CHOICE_KEYS)  # buttons in key order: a key is also always at the same place

    def view(user: str, status: str, old_ref: str | None, reason: object = None, task: object = None) -> list:
        task = store.next_task(user) if task is None else task or None  # False: known to be finished
        ref = items.token(user, task.item_id, task.item_id) if task is not None else ""
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
        if task is None:
            media_html = _media_html(None, "", ("", ""))
        elif ref != old_ref:
            srcs = (media.url(user, (task.item_id, "left"), task.left), media.url(user, (task.item_id, "right"),
                                                                                   task.right))
            media_html = _media_html(task, ref, srcs)
        else:
            media_html = gr.skip()
        offered = set(options_for(task.criterion)) if task is not None else set()
        crit_md = "" if task is None else f"### {CRITERION_LABELS[task.criterion]}\n{_DESCRIPTIONS[task.criterion]}"
        buttons = [gr.Button(visible=c in offered) for c in choices]
        return [header, prompt, media_html, crit_md, *buttons, _token(ref, task), status,
                gr.skip() if reason is None else reason]

    def on_load(request: gr.Request) -> list:
        return view(user_of(request), "", None)

    def seen(user: str, token: str) -> tuple[str, str | None, str]:
        """(item ref, item id or None, criterion) of the token the page sent."""
        if len(token) > MAX_TOKEN_CHARS:
            return "", None, ""
        ref, _, criterion = token.partition("|")
        return ref, items.value(user, ref) if ref else None, criterion

    def choose(choice: str, token: str, request: gr.Request) -> list:
        user = user_of(request)
        ref, item_id, criterion = seen(user, token)
        if item_id is None or criterion not in CRITERION_LABELS:
            return view(user, "⚠ not saved: the page was out of date and has been refreshed", ref)
        if choice not in options_for(criterion):
            return view(user, f"⚠ not saved: {CHOICE_LABELS[choice]} is not an answer to this question", ref)
        try:  # one file operation: stored only if this is the annotator's current question, plus the next one
            done = store.answer(user, item_id, criterion, choice)
        except (NotAssigned, InvalidJudgment, AlreadyJudged) as exc:
            return view(user, f"⚠ not saved: {exc}", ref)
        label, after = CRITERION_LABELS[criterion], done.task or False
        if done.saved:
            return view(user, f"✓ saved: {label} = {CHOICE_LABELS[choice]}", ref, task=after)
        if done.previous == choice:  # a second press of the same answer (double click, stale screen)
            return view(user, f"✓ already saved: {label} = {CHOICE_LABELS[choice]}", ref, task=after)
        if done.previous is not None:
            return view(user, f"⚠ not changed: {label} was already saved as {CHOICE_LABELS[done.previous]} "
                        "(press U to undo it)", ref, task=after)
        # The screen was stale (other tab, restarted server): refresh instead of judging the wrong criterion.
        return view(user, "⚠ not saved: the page was out of date and has been refreshed", ref, task=after)

    def undo(token: str, request: gr.Request) -> list:
        user = user_of(request)
        undone = store.undo_last(user)
        msg = "nothing to undo" if undone is None else (
            f"↶ undone: {CRITERION_LABELS[undone[2]]} of this pair" if undone[0] == "judgment" else "↶ skip undone")
        return view(user, msg, seen(user, token)[0] or None)

    def skip(reason: str, token: str, request: gr.Request) -> list:
        user = user_of(request)
        ref, item_id, _ = seen(user, token)
        current = store.next_task(user)
        if current is None or item_id is None or current.item_id != item_id:
            return view(user, "⚠ not skipped: the page was out of date and has been refreshed", ref)
        reason = (reason or "").strip()
        if not reason:
            return view(user, "⚠ not skipped: give a reason", ref)
        if len(reason) > MAX_REASON_CHARS:
            return view(user, f"⚠ not skipped: the reason is {len(reason)} characters long, at most "
                        f"{MAX_REASON_CHARS} are accepted", ref)
        store.skip(user, item_id, reason)
        return view(user, "⏭ skipped", ref, reason="")  # an empty box for the next pair

    with gr.Blocks(title="K5 side-by-side annotation") as app:
        header = gr.Markdown(elem_id="k5-header")
        prompt = gr.Markdown(visible=False, elem_id="k5-prompt")
        media_block = gr.HTML(elem_id="k5-media-block", padding=False)
        crit = gr.Markdown(elem_id="k5-criterion")
        with gr.Row(elem_id="k5-answers"):
            buttons = [gr.Button(_choice_button(c), visible=False, elem_id=f"k5-key-{CHOICE_KEYS[c]}", size="md")
                       for c in choices]
        status = gr.Markdown(elem_id="k5-status")
        with gr.Row(equal_height=True):
            undo_btn = gr.Button("[U] Undo last judgment", elem_id="k5-undo", variant="secondary", size="md")
            reason = gr.Textbox(show_label=False, placeholder="Skip reason, e.g. video does not load",
                                elem_id="k5-skip-reason", scale=3, max_length=MAX_REASON_CHARS, lines=1)
            skip_btn = gr.Button("Skip pair", elem_id="k5-skip", size="md")
        # Rendered but hidden: its value travels with every click, so the server knows what the annotator saw.
        token = gr.Textbox(visible="hidden", elem_id="k5-token")
        outputs = [header, prompt, media_block, crit, *buttons, token, status, reason]
        app.load(on_load, inputs=None, outputs=outputs, api_name="view")
        for c, b in zip(choices, buttons):
            b.click(_bind(choose, c), inputs=[token], outputs=outputs, api_name=f"choose_{CHOICE_KEYS[c]}")
        undo_btn.click(undo, inputs=[token], outputs=outputs, api_name="undo")
        skip_btn.click(skip, inputs=[reason, token], outputs=outputs, api_name="skip")
        for mount in extra_tasks:  # other task types (e.g. ui.sft_task.sft_task) below, on the same logins and media
            mount(app, media)
    app.k5_guard = LoginGuard(password_lookup, login_policy)  # picked up by serve()
    app.k5_media = media  # a task mounted beside this one grants its media here
    return app


def _bind(choose: object, choice: str) -> object:
    # Gradio injects gr.Request by annotation, which a lambda cannot carry.
    def handler(token: str, request: gr.Request) -> list:
        return choose(choice, token, request)

    return handler


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve ``app`` (from ``build_app``) with guarded logins and private media; returns the local URL."""
    server = build_server(app, app.k5_guard, app.k5_media, head=_HEAD_JS, css=_CSS,
                          auth_message="K5 side-by-side evaluation: log in with your annotator account")
    return run_server(server, host, port, block=block)


def add_credentials(path: Path, name: str, password: str) -> None:
    """Add or replace ``name``'s line in a credentials file, written atomically with owner-only permissions."""
    if not name or ":" in name or name != name.strip():
        raise SystemExit(f"Error: annotator name {name!r} must be non-empty, without ':' or surrounding spaces")
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.strip().startswith("#") or ln.partition(":")[0].strip() != name]
    write_private_text(path, "\n".join([*kept, f"{name}:{hash_password(password)}"]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.annotation_app")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the annotation app")
    s.add_argument("--db", required=True, help="judgments DuckDB file (created if missing)")
    s.add_argument("--plan", help="annotation plan JSON (sbs_plan.Plan.to_json); loaded into the DB")
    s.add_argument("--media-root", required=True)
    s.add_argument("--credentials", help="credentials file; default: the DB's annotators table")
    s.add_argument("--sft-db", help="also mount the SFT annotation task on this store (ui/sft_task.py)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    d = sub.add_parser("serve-demo",
                       help="serve a materialized SBS batch folder (K5_HOME/sbs/<comparison>) on its judgments store, "
                       "with demo logins (every planned annotator, password 'demo'); used by `make ui`")
    d.add_argument("batch", help="folder written by the sbs_batch asset (plan.json, media/)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=7860)
    h = sub.add_parser("hash-password", help="read a password on stdin, print a credentials line "
                       "(or add it to --credentials FILE, created owner-only)")
    h.add_argument("name")
    h.add_argument("--credentials", help="credentials file to add the line to (replacing NAME's old line)")
    args = parser.parse_args(argv)
    if args.cmd == "hash-password":
        password = sys.stdin.readline().rstrip("\n")
        if args.credentials:
            add_credentials(Path(args.credentials), args.name, password)
        else:
            print(f"{args.name}:{hash_password(password)}")
        return 0
    os.umask(0o077)  # the server writes judgments and password hashes: owner-only files (as PostgreSQL does)
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
        serve(build_app(store, plan, batch / "media", store.password_hash), args.host, args.port, block=True)
        return 0
    store = JudgmentsStore(args.db)
    plan = Plan.from_json(Path(args.plan).read_text()) if args.plan else None
    lookup = password_lookup_from_file(args.credentials) if args.credentials else store.password_hash
    extra = []
    if args.sft_db:
        from evaluation.sft.store import SftStore
        from ui.sft_task import sft_task

        extra.append(sft_task(SftStore(args.sft_db)))
    serve(build_app(store, plan, args.media_root, lookup, extra_tasks=extra), args.host, args.port, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
