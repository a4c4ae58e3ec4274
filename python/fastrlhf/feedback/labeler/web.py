"""Labeling in the browser: a small Starlette app served by uvicorn (:func:`serve_web_labeler`).

One page (:mod:`~fastrlhf.feedback.labeler.page`: keys ``1`` / ``2`` / ``t`` / ``s`` / ``u``, or
``1``-``5`` when rating, and buttons) over three JSON endpoints:

* ``GET api/next?annotator=NAME[&prefer=KEY]``: ``{"mode", "done", "total", "item"}``, the first item
  NAME has not labeled (``prefer``'s when it is pending), ``item`` null when all are done;
* ``POST api/judge`` ``{"annotator", "key", "choice" | "rating" | "skip": true}``: 409 if NAME already
  labeled that item, 404 for an unknown key;
* ``POST api/undo`` ``{"annotator"}``: undoes NAME's latest judgment, ``{"undone": KEY or null, ...}``.

Several annotators label at once, each through the items they have not done; everything goes
into one :class:`~fastrlhf.feedback.store.PreferenceStore`.

Access: on a loopback address (the default, 127.0.0.1) no token is needed, but requests must name
a loopback ``Host`` (against DNS rebinding). On any other address a token is required: a random one
unless given, printed with the URL (``?token=...``); every request without it gets 403. POST
bodies must be ``application/json`` (a cross-site form cannot send that without a preflight,
which the server does not grant).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from urllib.parse import parse_qs

from fastrlhf.feedback.labeler.items import LabelQueue, Mode, as_queue
from fastrlhf.feedback.labeler.page import page
from fastrlhf.feedback.store import PreferenceStore


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Gate:
    """ASGI middleware: the token (or, without one, a loopback Host header) before anything else."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            why = self._refuse(scope)
            if why:
                from starlette.responses import JSONResponse

                await JSONResponse({"error": why}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refuse(self, scope) -> str | None:
        if self.token is not None:
            got = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
            if not secrets.compare_digest(got.encode(), self.token.encode()):
                return "forbidden: open the URL printed by the labeler, with its ?token=..."
            return None
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        name = host if host.endswith("]") or host.count(":") != 1 else host.rsplit(":", 1)[0]
        if not is_loopback(name):
            return f"forbidden: Host {host!r} is not a loopback name"
        return None


class WebLabeler:
    """The web labeler's app and server; :meth:`start` runs it in a background thread.

    Args:
        store: where the judgments go.
        items: a :class:`LabelQueue`, or :class:`~fastrlhf.feedback.labeler.items.LabelItem` s, or
            ``(prompt, a, b)`` / ``(prompt, completion)`` tuples.
        host: the address to listen on (loopback by default; anything else requires the token).
        port: the port; 0 picks a free one (:attr:`port` after :meth:`start`).
        token: the access token; None: none on loopback, a random one elsewhere.
        mode: ``"compare"`` or ``"rate"`` (default: the queue's; compare for tuples).
        log_level: uvicorn's log level.
    """

    def __init__(self, store: PreferenceStore, items: LabelQueue | Sequence, *, host: str = "127.0.0.1",
                 port: int = 0, token: str | None = None, mode: Mode | None = None, log_level: str = "warning"):
        if not isinstance(store, PreferenceStore):
            raise TypeError(f"WebLabeler: store must be a PreferenceStore, got {type(store).__name__}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"WebLabeler: port must be an int in [0, 65535], got {port!r}")
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise ValueError("WebLabeler: token must be a string of at least 8 characters")
        self.store, self.queue = store, as_queue(items, mode)
        self.host, self.port, self.log_level = host, port, log_level
        self.token = token if token is not None or is_loopback(host) else secrets.token_urlsafe(16)
        self._lock = threading.Lock()  # a judgment's "already labeled?" check and its append, together
        self._server = self._thread = None
        self.app = _Gate(self._build_app(), self.token)

    # -- the app --------------------------------------------------------------------------------

    def _state(self, annotator: str, prefer: str | None = None) -> dict:
        done = self.store.done_keys(annotator)
        item = self.queue.next_item(done, prefer)
        n_done, total = self.queue.progress(done)
        body = None if item is None else {"key": item.key, "prompt": item.prompt, "completions": list(item.completions)}
        return {"mode": self.queue.mode, "done": n_done, "total": total, "item": body}

    def _judge(self, body: dict) -> tuple[int, dict]:
        who, key = body.get("annotator"), body.get("key")
        i = self.queue.index(key) if isinstance(key, str) else None
        if i is None:
            return 404, {"error": f"unknown item key {key!r}"}
        it = self.queue.get(i)
        kw = dict(annotator=who, item=it.key)
        with self._lock:
            if it.key in self.store.done_keys(who):
                return 409, {"error": "you already labeled this item (u undoes it)"}
            if body.get("skip") is True:
                rec = self.store.add_skip(it.prompt, list(it.completions), meta=list(it.meta), **kw)
            elif self.queue.mode == "compare":
                choice = body.get("choice")
                if choice not in (0, 1, "tie") or isinstance(choice, bool):
                    return 400, {"error": f"choice must be 0, 1 or 'tie', got {choice!r}"}
                rec = self.store.add_preference(it.prompt, list(it.completions), choice, meta=list(it.meta), **kw)
            else:
                rating = body.get("rating")
                if rating not in (1, 2, 3, 4, 5) or isinstance(rating, bool):
                    return 400, {"error": f"rating must be 1-5, got {rating!r}"}
                rec = self.store.add_rating(it.prompt, it.completions[0], rating, meta=it.meta[0], **kw)
        return 200, {"id": rec["id"], **self._state(who)}

    def _undo(self, body: dict) -> tuple[int, dict]:
        who = body.get("annotator")
        with self._lock:
            undone = self.store.undo(who)
        key = undone.get("item") if undone else None
        return 200, {"undone": key, **self._state(who, key)}

    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import HTMLResponse, JSONResponse
        from starlette.routing import Route

        html = page(self.queue.mode)

        def annotator_ok(name) -> str | None:
            if not isinstance(name, str) or not name.strip() or len(name) > 100:
                return "annotator must be a non-empty name of at most 100 characters"
            return None

        async def index(request):
            return HTMLResponse(html, headers={"Cache-Control": "no-store"})

        async def next_item(request):
            who = request.query_params.get("annotator")
            why = annotator_ok(who)
            if why:
                return JSONResponse({"error": why}, status_code=400)
            return JSONResponse(await run_in_threadpool(self._state, who, request.query_params.get("prefer")))

        def post(handler):
            async def endpoint(request):
                if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                    return JSONResponse({"error": "POST bodies must be application/json"}, status_code=415)
                try:
                    body = await request.json()
                except ValueError:
                    return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
                why = annotator_ok(body.get("annotator")) if isinstance(body, dict) else "the body must be an object"
                if why:
                    return JSONResponse({"error": why}, status_code=400)
                status, out = await run_in_threadpool(handler, body)
                return JSONResponse(out, status_code=status)
            return endpoint

        return Starlette(routes=[
            Route("/", index),
            Route("/api/next", next_item),
            Route("/api/judge", post(self._judge), methods=["POST"]),
            Route("/api/undo", post(self._undo), methods=["POST"]),
        ])

    # -- the server -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The page's address (a wildcard host shows as 127.0.0.1), with ``?token=`` when there is one."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self, timeout: float = 10.0) -> int:
        """Serve in a daemon thread; returns the bound port.

        Args:
            timeout: seconds to wait for the server to start.
        """
        import uvicorn

        if self._thread is not None:
            raise RuntimeError("WebLabeler.start: already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as e:
            raise OSError(f"WebLabeler: cannot listen on host={self.host!r} port={self.port}: {e}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"fastrlhf-labeler-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"WebLabeler: the server on port {self.port} did not start")
            time.sleep(0.01)
        return self.port

    def stop(self) -> None:
        """Stop the server and wait for its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> WebLabeler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_web_labeler(store: PreferenceStore, items: LabelQueue | Sequence, *, host: str = "127.0.0.1",
                      port: int = 0, token: str | None = None, mode: Mode | None = None, block: bool = True,
                      print_fn=print) -> WebLabeler:
    """Serve the labeling page and print its URL (with the token when one is needed).

    Args:
        store: where the judgments go.
        items: what to label (see :class:`WebLabeler`).
        host: the address to listen on; 127.0.0.1 by default. Any non-loopback address requires
            the access token.
        port: the port; 0 picks a free one.
        token: the access token; None: none on loopback, a random one elsewhere.
        mode: ``"compare"`` or ``"rate"``.
        block: serve until Ctrl-C (True), or return the running labeler (call ``stop()``).
        print_fn: where the URL is printed.

    Returns:
        The :class:`WebLabeler` (stopped when ``block`` is True).
    """
    lab = WebLabeler(store, items, host=host, port=port, token=token, mode=mode)
    lab.start()
    where = " (listening on every interface: from elsewhere, use this machine's address)" \
        if host in ("", "0.0.0.0", "::") else ""
    print_fn(f"labeler: open {lab.url}{where}; {len(lab.queue)} items, judgments go to {store.path}")
    if block:
        lab.wait()
    return lab
