"""The annotation server: Gradio Blocks mounted on a FastAPI app that adds guarded logins and private media.

* ``OpaqueRefs`` -- random per-annotator tokens standing for server-side values (an item, a media file). Pages carry
  only tokens, so neither model side, golden status, item ids nor server paths reach the browser, and a token means
  nothing to another annotator.
* ``/media/<token>`` -- serves a media file to the annotator it was granted to; anyone else (another annotator, no
  session, an unknown token) gets the same 404. No file name, modification time or ETag is sent (the generation
  order of the files would tell the sides apart).
* ``build_server`` -- the FastAPI app: client-address middleware for the login guard, the media route, the Gradio
  app at ``/`` with ``LoginGuard.login`` as its async ``auth``; every other path answers 404 (no files from disk).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import fastapi
import gradio as gr
import uvicorn
from starlette.responses import FileResponse, Response

from ui.security import ClientAddressMiddleware, LoginGuard

MEDIA_PREFIX = "/media/"


class OpaqueRefs:
    """Per-owner random tokens for server-side values; the same (owner, key) keeps its token. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, Hashable], str] = {}
        self._by_token: dict[str, tuple[str, Any]] = {}

    def token(self, owner: str, key: Hashable, value: Any) -> str:
        """The token of ``key`` for ``owner`` (created on first use), standing for ``value``."""
        with self._lock:
            tok = self._by_key.get((owner, key))
            if tok is None:
                tok = secrets.token_urlsafe(18)
                self._by_key[(owner, key)] = tok
            self._by_token[tok] = (owner, value)
            return tok

    def value(self, owner: str, token: str) -> Any | None:
        """The value behind ``token`` if it was issued to ``owner``; None otherwise (unknown or someone else's)."""
        with self._lock:
            hit = self._by_token.get(token)
        if hit is None or hit[0] != owner:
            return None
        return hit[1]


class MediaGrants(OpaqueRefs):
    """Media files under one root, granted per annotator: ``url(owner, key, relative_path)`` -> ``/media/<token>``."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root).resolve()

    def url(self, owner: str, key: Hashable, relative_path: str) -> str:
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"media path {relative_path!r} leaves the media root; fix the plan")
        return MEDIA_PREFIX + self.token(owner, key, path)

    def file_for(self, owner: str, token: str) -> Path | None:
        path = self.value(owner, token)
        return path if isinstance(path, Path) and path.is_file() else None


class _PrivateFileResponse(FileResponse):
    """A file response without Last-Modified/ETag (they would leak the files' generation order)."""

    def set_stat_headers(self, stat_result: Any) -> None:
        self.headers["content-length"] = str(stat_result.st_size)


def user_of(request: gr.Request) -> str:
    """The logged-in annotator of a Gradio event (identity comes only from the login session)."""
    user = getattr(request, "username", None)
    if not user:
        raise gr.Error("not logged in")
    return user


def session_user(gradio_app: Any, request: fastapi.Request) -> str | None:
    """The annotator logged in on this request's Gradio session cookie (None without a valid session).
    Mirrors Gradio's own ``get_current_user`` (routes.py), which the mounted app uses for its pages and events."""
    cookie_id = gradio_app.cookie_id
    token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{cookie_id}")
    return gradio_app.tokens.get(token) if token else None


def build_server(blocks: gr.Blocks, guard: LoginGuard, media: MediaGrants, *, head: str = "", css: str = "",
                 auth_message: str = "", concurrency: int = 32) -> fastapi.FastAPI:
    """The FastAPI app serving ``blocks`` at ``/`` behind ``guard`` with ``media`` under ``/media/``."""
    server = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    server.add_middleware(ClientAddressMiddleware)
    mounted: dict[str, Any] = {}

    @server.api_route(MEDIA_PREFIX + "{token}", methods=["GET", "HEAD"])
    def media_file(token: str, request: fastapi.Request) -> Response:
        user = session_user(mounted["gradio"], request)
        path = media.file_for(user, token) if user else None
        if path is None:
            return Response("Not Found", status_code=404, media_type="text/plain")
        return _PrivateFileResponse(path, headers={"Cache-Control": "private, no-store"})

    # Many annotators submit at once; the store serialises the writes itself, so Gradio's queue need not.
    blocks.queue(default_concurrency_limit=concurrency)
    gr.mount_gradio_app(server, blocks, path="/", auth=guard.login, auth_message=auth_message, head=head, css=css,
                        ssr_mode=False, footer_links=[], allowed_paths=[], show_error=True,
                        app_kwargs={"docs_url": None, "redoc_url": None, "openapi_url": None})
    mounted["gradio"] = server.routes[-1].app
    return server


def run_server(server: fastapi.FastAPI, host: str, port: int, block: bool = True) -> str:
    """Serve with uvicorn (proxy headers trusted from localhost only, uvicorn's default); returns the URL. With
    ``block=False`` the server runs in a daemon thread and this returns once it accepts connections."""
    config = uvicorn.Config(server, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    srv = uvicorn.Server(config)
    url = f"http://{host}:{port}/"
    if block:
        srv.run()
        return url
    thread = threading.Thread(target=srv.run, daemon=True, name="k5-annotation-server")
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"annotation server did not start on {host}:{port}")
        time.sleep(0.05)
    return url
