"""The web console: sandboxes by phase, a live table, one sandbox's timeline and logs, the
log's events and the dead letters, in a browser (docs/console.md).

A Starlette app served by uvicorn inside the process's event loop, as the ``console`` service
of ``up`` and ``serve`` (``serve --only console``). It is a front end over the SDK, as the
command line is, and lives beside it: the command line hands it to the control plane it runs
(runtime/embedded.py serves it and knows nothing of the web). What it promises:

- **It acts as the signed-in user.** Sign-in takes a sandboxctl user name and password (its
  NATS credentials); the console connects a ``SandboxClient`` as that user for the session, so
  every read and every command is checked by NATS and the state machine exactly as the CLI's
  are. Buttons are shown only to a role that may send commands; a forged POST from any other
  is refused by the state machine all the same (and recorded in the audit stream). With
  authorization off there is no sign-in: each browser gets a session of its own.
- **Live from the log, not polled.** The table, the counts, a sandbox's timeline and the event
  stream are server-sent events fed by the SDK's own follow of the log (``events``, as
  ``events --follow`` reads it); each event of a sandbox re-reads that sandbox's row at least at
  that event's sequence, so the row shown is never older than the event that moved it.
- **Hostile text stays text.** Names, labels, reasons and actors come from the log and may hold
  anything: the pages escape them, and the browser's script writes them as text only. Pages
  carry a Content-Security-Policy that runs no inline script and loads nothing from elsewhere.
- **Sessions are cookies that carry no secret.** A random id (HttpOnly, SameSite=Strict) maps to
  the session's client; it ends on sign-out, after ``SESSION_IDLE`` seconds unused, or when the
  console stops, and its connection is closed then. Every POST also carries the session's own
  token (a form field or the ``X-CSRF-Token`` header), and one from another origin is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import json
import logging
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import msgspec
import uvicorn
from nats.aio.client import Client as NATS
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sandboxctl import audit
from sandboxctl.auth import WRITE, Authorizer, AuthStore, has_role
from sandboxctl.bus.tail import reraise_if_cancelling
from sandboxctl.cli.attach import show_logs
from sandboxctl.cli.output import ago, iso, short_type, why
from sandboxctl.client import NotFound, PermissionDenied, SandboxClient, SandboxError, Unauthenticated, Unavailable
from sandboxctl.events import subjects
from sandboxctl.events.replies import ErrorCode
from sandboxctl.observe.address import parse_address
from sandboxctl.runtime.config import CONSOLE_ENV, CONSOLE_WHAT, Config, parse_labels
from sandboxctl.runtime.embedded import url_of
from sandboxctl.statemachine.names import validate_name
from sandboxctl.statemachine.phases import Phase

log = logging.getLogger(__name__)

COOKIE = "sandboxctl_session"  # + "_<port>": consoles on other ports of one host keep their own
SESSION_IDLE = 8 * 3600.0  # seconds a session may go unused before it is closed
SESSIONS_MAX = 256  # sessions at once: each holds a NATS connection
SESSIONS_PER_USER = 8  # one user's sessions at once; a new one ends that user's oldest
STREAMS_PER_SESSION = 8  # event streams one session may hold open (each follows the log)
STREAMS_MAX = 64  # event streams at once, all sessions together
BODY_MAX = 16384  # bytes of a form or a POST's body that are read at all
KEEPALIVE = 10.0  # seconds between comments on a quiet event stream (a gone browser is noticed)
RECENT_EVENTS = 100  # the events page without ``since`` starts this far back from the log's head
LOG_LINES = 200  # a sandbox's page shows the last so many lines of its logs
VERBS = ("stop", "start", "delete")
STATIC = Path(__file__).parent
# Each error code's HTTP status; anything else is 500.
STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    "unauthenticated": 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.UNAVAILABLE: 503,
    "timeout": 504,
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form's Origin "null"
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    """One signed-in browser: its user's client, the token its POSTs carry, what its role may do."""

    id: str
    user: str
    client: SandboxClient
    may_write: bool
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    used: float = field(default_factory=time.monotonic)
    streams: set[asyncio.Task[Any]] = field(default_factory=set)  # its open event streams' producers


@dataclass
class Filters:
    """The table's filters: a phase, a driver, labels (``k=v,...``), part of a name, or one sandbox."""

    phase: str = ""
    driver: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    name: str = ""
    sandbox: str = ""

    @classmethod
    def of(cls, request: Request) -> Filters:
        q = request.query_params
        labels = q.get("label", "").strip()
        try:
            parsed = parse_labels(labels, "label") if labels else {}
        except ValueError as exc:
            raise SandboxError.of(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        phase = q.get("phase", "").strip()
        if phase and phase not in {p.value for p in Phase}:
            raise SandboxError.of(ErrorCode.INVALID_ARGUMENT, f"unknown phase {phase[:40]!r}")
        sandbox = sandbox_name(q.get("sandbox", ""))
        return cls(phase, q.get("driver", "").strip()[:64], parsed, q.get("name", "").strip()[:256], sandbox)

    def matches(self, row: dict[str, Any]) -> bool:
        labels = row.get("labels") or {}
        return (
            (not self.phase or row["phase"] == self.phase)
            and (not self.driver or row.get("driver") == self.driver)
            and all(labels.get(k) == v for k, v in self.labels.items())
            and (not self.name or self.name in row["name"])
            and (not self.sandbox or row["name"] == self.sandbox)
            and (row["phase"] != Phase.DELETED.value or self.phase == Phase.DELETED.value)
        )


def sandbox_name(text: str) -> str:
    """A sandbox's name from a request, checked as every command's is (it becomes a subject's
    token); "" for none. InvalidArgument, saying why, for one that is no name."""
    name = text.strip()
    problem = validate_name(name) if name else None
    if problem:
        raise SandboxError.of(ErrorCode.INVALID_ARGUMENT, problem)
    return name


def allowed_host(host_header: str, bound: str) -> bool:
    """Whether a request's Host names this console as a browser reached it: an IP address,
    ``localhost``, or the host the console was bound to by name. Any other name may be a site's
    own domain pointed at this address (DNS rebinding), whose pages would then be same-origin."""
    try:
        host = urlsplit(f"//{host_header}").hostname or ""
    except ValueError:  # not a host at all ("[::1")
        return False
    if host in ("localhost", bound.lower()):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def row_of(item: dict[str, Any]) -> dict[str, Any]:
    """What the table shows of a sandbox, as JSON for the browser (times in ISO 8601)."""
    return {
        "name": item["name"],
        "phase": item["phase"],
        "driver": item.get("driver", ""),
        "host": item.get("host", ""),
        "image": item.get("image", ""),
        "labels": item.get("labels") or {},
        "last_error": item.get("last_error") or "",
        "updated_at": iso(item.get("updated_at")),
        "last_seq": item.get("last_seq", 0),
    }


def event_of(seq: int, envelope: Any) -> dict[str, Any]:
    """One event as the browser shows it: who, what, why and when."""
    data = msgspec.to_builtins(envelope.data)
    return {
        "seq": seq,
        "time": envelope.time.isoformat(timespec="milliseconds"),
        "sandbox": envelope.subject,
        "type": short_type(envelope.type),
        "actor": envelope.actor,
        "why": why(data if isinstance(data, dict) else {}),
    }


def sse(event: str, data: Any) -> str:
    """One server-sent event (JSON has no raw newline, so one ``data:`` line holds it)."""
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def error_response(exc: SandboxError, as_json: bool, session: Session | None = None) -> Response:
    """A refusal with its code's status: ``{"error": {"code", "message"}}`` for a script, a page
    naming the code for a person."""
    status = STATUS.get(exc.code, 500)
    if as_json:
        return JSONResponse({"error": {"code": str(exc.code), "message": exc.message}}, status, SECURITY_HEADERS)
    body = f'<h1>{status}</h1><p class="error"><code>{esc(exc.code)}</code>: {esc(exc.message)}</p>'
    return HTMLResponse(page("error", body, session), status, SECURITY_HEADERS)


def esc(value: Any) -> str:
    """Text (and attribute values) for a page: whatever the log holds stays text."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, session: Session | None, kind: str = "", extra: dict[str, str] | None = None) -> str:
    """A whole page: the navigation, ``body`` (already escaped), and what the script needs in data attributes."""
    data = {
        "page": kind,
        "csrf": session.csrf if session else "",
        "may-write": "1" if session and session.may_write else "",
    }
    data.update(extra or {})
    attrs = " ".join(f'data-{k}="{esc(v)}"' for k, v in data.items())
    who = ""
    if session is not None and session.user:
        who = (
            f'<form method="post" action="/logout" class="who">signed in as <b id="user">{esc(session.user)}</b> '
            f'<input type="hidden" name="csrf" value="{esc(session.csrf)}"><button>Sign out</button></form>'
        )
    nav = (
        '<nav><a href="/">Sandboxes</a> <a href="/events">Events</a> <a href="/deadletters">Dead letters</a>'
        f"{who}</nav>"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sandboxctl · {esc(title)}</title>'
        '<link rel="stylesheet" href="/static/console.css"><script src="/static/console.js" defer></script></head>'
        f"<body {attrs}>{nav}<main>{body}</main></body></html>"
    )


class HostCheck:
    """Answers 400 to a request whose Host is not ``allowed_host``, before any page or session."""

    def __init__(self, app: ASGIApp, bound: str) -> None:
        self.app = app
        self.bound = bound

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not allowed_host(Headers(scope=scope).get("host", ""), self.bound):
            refusal = PlainTextResponse(
                "this console answers to an IP address, localhost or the host it was bound to", 400, SECURITY_HEADERS
            )
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn, leaving signals to the process: ``up`` and ``serve`` stop their services themselves."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class Console:
    """The console as a service of the process: its tasks are uvicorn's server and the sweep of
    idle sessions; a restart serves a new instance on the same listening socket."""

    def __init__(self, nc: NATS, listening: socket.socket, config: Config, auth: AuthStore | None) -> None:
        self.nc = nc
        self.config = config
        self.auth = auth
        self.authorizer = Authorizer(auth) if auth is not None else None
        self.socket = listening.dup()  # uvicorn closes what it serves; the plane keeps the original
        self.url = url_of(listening)
        self.cookie = f"{COOKIE}_{listening.getsockname()[1]}"
        setting = parse_address(config.console, CONSOLE_WHAT) if config.console else None
        self.bound = setting[0] if setting else ""  # the host it was bound to, as the setting names it
        self.sessions: dict[str, Session] = {}
        self._anonymous: SandboxClient | None = None  # every session's, when the server has no users
        self.tasks: list[asyncio.Task[None]] = []
        self._server: _Server | None = None
        self.app = Starlette(
            middleware=[Middleware(HostCheck, bound=self.bound)],
            routes=[
                Route("/", self.index),
                Route("/login", self.login, methods=["GET", "POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/sandboxes/{name}", self.sandbox),
                Route("/sandboxes/{name}/{verb}", self.act, methods=["POST"]),
                Route("/events", self.events_page),
                Route("/deadletters", self.deadletters),
                Route("/stream/sandboxes", self.stream_sandboxes),
                Route("/stream/events", self.stream_events),
                Route("/static/{file}", self.static),
                Route("/favicon.ico", lambda _request: Response(status_code=204)),
            ],
        )

    async def start(self) -> None:
        host = self.socket.getsockname()[0]
        if self.auth is None and not ipaddress.ip_address(host).is_loopback:
            # Without users, whoever reaches the port acts on every sandbox.
            raise Unavailable(
                f"the console is served without sign-in (NATS has no users) on {host}, which is not loopback: "
                f"serve it on 127.0.0.1, or turn it off (--console off or {CONSOLE_ENV}=off)"
            )
        uv = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            server_header=False,
        )
        self._server = _Server(uv)
        self.tasks.append(asyncio.create_task(self._server.serve(sockets=[self.socket]), name="console-http"))
        self.tasks.append(asyncio.create_task(self._sweep(), name="console-sessions"))
        while not self._server.started:
            if self.tasks[0].done():
                await self.tasks[0]  # its failure is the start's
                raise RuntimeError("the console's server ended as it started")
            await asyncio.sleep(0.01)
        log.info("console at %s", self.url)

    async def stop(self) -> None:
        try:
            if self._server is not None:
                self._server.should_exit = True
            for session in self.sessions.values():  # each open event stream ends at once
                for producer in session.streams:
                    producer.cancel()
            if self.tasks:  # uvicorn's own graceful stop first, within a bound
                await asyncio.wait(self.tasks[:1], timeout=5)
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            await asyncio.gather(*(self._end(s) for s in list(self.sessions.values())), return_exceptions=True)
            if self._anonymous is not None:
                with contextlib.suppress(Exception):
                    await self._anonymous.close()
            self.socket.close()

    # -- sessions ---------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            reraise_if_cancelling()
            await asyncio.sleep(60)
            now = time.monotonic()
            for session in [s for s in self.sessions.values() if now - s.used > SESSION_IDLE]:
                log.info("console: session of %s closed after %gs unused", session.user or "(no user)", SESSION_IDLE)
                await self._end(session)

    async def _end(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        for producer in session.streams:  # a stream of a session that ended ends with it
            producer.cancel()
        if session.client is not self._anonymous:  # the shared one is closed with the console
            with contextlib.suppress(Exception):
                await session.client.close()

    async def _open(self, user: str, password: str) -> Session:
        """A session as ``user`` (authorization off: as no one), its client connected. Raises
        Unauthenticated when NATS refuses the user and password."""
        if self.auth is None:
            # No users: every browser acts as no one, on one shared connection; a session is only
            # its token, and the oldest gives way to a new one rather than refuse it.
            if len(self.sessions) >= SESSIONS_MAX:
                await self._end(min(self.sessions.values(), key=lambda s: s.used))
            if self._anonymous is None:
                self._anonymous = await self._connect(actor="console")
            client, may_write = self._anonymous, True
        else:
            if len(self.sessions) >= SESSIONS_MAX:
                raise SandboxError.of(ErrorCode.UNAVAILABLE, f"the console holds {SESSIONS_MAX} sessions already")
            client = await self._connect(user=user, password=password)
            theirs = sorted((s for s in self.sessions.values() if s.user == user), key=lambda s: s.used)
            for oldest in theirs[: max(0, len(theirs) - SESSIONS_PER_USER + 1)]:
                await self._end(oldest)  # one user cannot hold every session
            assert self.authorizer is not None
            # Roles as the state machine reads them (users.json where the console runs; none
            # known there: no buttons, and the state machine decides all the same).
            may_write = has_role(self.authorizer.roles(user) or [], WRITE)
        session = Session(secrets.token_urlsafe(32), user, client, may_write)
        self.sessions[session.id] = session
        return session

    async def _connect(self, **who: str) -> SandboxClient:
        """A client on the console's NATS. Connected with the SDK's few attempts, so a wrong
        password is told at once (with no bound nats-py would try it for ever); from then on it
        rides out a server's restart, as ``events --follow`` does: nats-py reads this option at
        each reconnect."""
        client = await SandboxClient.connect(self.config.nats_url, **who)
        client.nc.options["max_reconnect_attempts"] = -1
        return client

    def _session(self, request: Request) -> Session | None:
        session = self.sessions.get(request.cookies.get(self.cookie, ""))
        if session is not None:
            if time.monotonic() - session.used > SESSION_IDLE:
                return None
            session.used = time.monotonic()
        return session

    async def _signed_in(self, request: Request) -> Session | Response:
        """The request's session, or where to go instead: sign-in (with authorization off, a new
        session for this browser is opened and its cookie set by ``_finish``)."""
        session = self._session(request)
        if session is not None:
            return session
        if self.auth is not None:
            target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""), safe="")
            return RedirectResponse(f"/login?next={target}", 303)
        return await self._open("", "")

    def _finish(self, response: Response, session: Session | None = None) -> Response:
        response.headers.update(SECURITY_HEADERS)
        if session is not None:
            response.set_cookie(self.cookie, session.id, httponly=True, samesite="strict", path="/")
        return response

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """A POST from a page of this console: browsers name the origin of every POST, and one that
        names none, or another site, is refused (HostCheck has vouched for the Host already)."""
        origin = request.headers.get("origin")
        return origin is not None and urlsplit(origin).netloc == request.headers.get("host", "")

    @staticmethod
    def _token_ok(token: str, session: Session) -> bool:
        """Whether ``token`` is the session's own (compared in constant time; any text, never an error)."""
        return secrets.compare_digest(token.encode(errors="replace"), session.csrf.encode())

    @staticmethod
    async def _form(request: Request) -> dict[str, str]:
        """The form in a POST's body, of which at most BODY_MAX bytes are read."""
        body = b""
        async for chunk in request.stream():
            body += chunk[: BODY_MAX - len(body)]
            if len(body) >= BODY_MAX:
                break
        return {k: v[0] for k, v in parse_qs(body.decode(errors="replace"), keep_blank_values=True).items()}

    # -- pages -------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        target = request.query_params.get("next", "/")
        if not re.fullmatch(r"/(?![/\\])[\w\-./?=&%]*", target):  # a page of this console, never another site's
            target = "/"
        if self.auth is None:
            return self._finish(RedirectResponse(target, 303))
        problem = ""
        if request.method == "POST":
            if not self._same_origin(request):
                return self._finish(Response("cross-origin sign-in refused", 403))
            form = await self._form(request)
            earlier = self._session(request)
            try:
                session = await self._open(form.get("user", "")[:100], form.get("password", "")[:200])
            except Unauthenticated:
                problem = "NATS did not accept that user name and password."
            except SandboxError as exc:
                problem = exc.message
            else:
                if earlier is not None:
                    await self._end(earlier)  # the same browser signed in again: its old session goes
                return self._finish(RedirectResponse(target, 303), session)
        body = (
            "<h1>Sign in</h1><p>Your sandboxctl user and password (its NATS credentials: "
            "<code>sandboxctl user add</code> makes them).</p>"
            + (f'<p class="error" id="problem">{esc(problem)}</p>' if problem else "")
            + f'<form method="post" action="/login?next={esc(quote(target, safe="/"))}" id="login">'
            '<label>User <input name="user" id="login-user" autocomplete="username" required></label> '
            '<label>Password <input name="password" id="login-password" type="password" '
            'autocomplete="current-password" required></label> <button id="login-submit">Sign in</button></form>'
        )
        return self._finish(HTMLResponse(page("sign in", body, None), 401 if problem else 200))

    async def logout(self, request: Request) -> Response:
        session = self._session(request)
        if session is not None:
            form = await self._form(request)
            if not self._same_origin(request) or not self._token_ok(form.get("csrf", ""), session):
                return self._finish(Response("missing or wrong token", 403))
            await self._end(session)
        response = RedirectResponse("/login" if self.auth is not None else "/", 303)
        response.delete_cookie(self.cookie, path="/")
        return self._finish(response)

    async def index(self, request: Request) -> Response:
        session = await self._signed_in(request)
        if isinstance(session, Response):
            return self._finish(session)
        q = request.query_params
        phases = "".join(
            f"<option{' selected' if q.get('phase') == p.value else ''}>{esc(p.value)}</option>" for p in Phase
        )
        body = (
            '<h1>Sandboxes</h1><section id="counts" aria-live="polite"></section>'
            '<form id="filters" method="get" action="/">'
            f'<label>Phase <select name="phase" id="f-phase"><option value="">any</option>{phases}</select></label> '
            f'<label>Driver <input name="driver" id="f-driver" value="{esc(q.get("driver", ""))}" size="8"></label> '
            f'<label>Label <input name="label" id="f-label" value="{esc(q.get("label", ""))}" '
            'placeholder="team=red" size="14"></label> '
            f'<label>Name <input name="name" id="f-name" value="{esc(q.get("name", ""))}" size="14"></label> '
            '<button id="f-apply">Filter</button> <a href="/">clear</a></form>'
            '<p id="notice" role="status"></p>' + TABLE + '<p id="live" class="muted">connecting…</p>'
        )
        return self._finish(HTMLResponse(page("sandboxes", body, session, "index")), session)

    async def sandbox(self, request: Request) -> Response:
        session = await self._signed_in(request)
        if isinstance(session, Response):
            return self._finish(session)
        client = session.client
        try:
            name = sandbox_name(request.path_params["name"])
            item = await client.get(name)
            history = await client.history(name)
        except SandboxError as exc:
            return self._finish(error_response(exc, False, session), session)
        steps = "".join(
            f'<li data-seq="{esc(h["seq"])}"><time datetime="{esc(iso(h.get("time")))}" '
            f'title="{esc(iso(h.get("time")))}">{esc(ago(h.get("time")))}</time> '
            f'<span class="who">{esc(h.get("actor", ""))}</span> '
            f'<span class="what">{esc(short_type(str(h.get("type", ""))))}</span> '
            f'<span class="phase">{esc(h.get("phase", ""))}</span> '
            f'<span class="why">{esc(why(h.get("data") or {}))}</span></li>'
            for h in history
        )
        logs = await self._logs(client, item)
        labels = ", ".join(f"{k}={v}" for k, v in sorted((item.get("labels") or {}).items()))
        details = "".join(
            f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>"
            for k, v in (
                ("image", item.get("image", "")),
                ("driver", item.get("driver", "")),
                ("host", item.get("host", "")),
                ("labels", labels),
                ("created", iso(item.get("created_at"))),
                ("last error", item.get("last_error") or ""),
            )
        )
        body = (
            f'<h1>Sandbox <span id="name">{esc(name)}</span></h1><p id="notice" role="status"></p>{TABLE}'
            f'<dl class="details">{details}</dl>'
            f'<h2>History</h2><ol id="timeline" class="timeline">{steps}</ol>'
            f'<h2>Logs</h2><pre id="logs">{esc(logs)}</pre><p id="live" class="muted">connecting…</p>'
        )
        extra = {"sandbox": name, "since": str(int(item.get("last_seq", 0)) + 1)}
        return self._finish(HTMLResponse(page(name, body, session, "sandbox", extra)), session)

    async def _logs(self, client: SandboxClient, item: dict[str, Any]) -> str:
        """The last LOG_LINES lines of the sandbox's output, read through its driver as ``logs``
        reads them; what went wrong instead, when they cannot be read here."""
        if item["phase"] in (Phase.DELETED.value, Phase.ARCHIVED.value):
            return f"(no logs: the sandbox is {item['phase']})"
        chunks: list[bytes] = []
        try:
            await asyncio.wait_for(
                show_logs(client, self.config, item["name"], tail=LOG_LINES, output=lambda _fd, b: chunks.append(b)),
                10,
            )
        except Exception as exc:  # an engine not reachable from here, a driver that has none
            reraise_if_cancelling()
            return f"(logs unavailable here: {exc})"
        text = b"".join(chunks).decode(errors="replace")
        return text or "(no output yet)"

    async def events_page(self, request: Request) -> Response:
        session = await self._signed_in(request)
        if isinstance(session, Response):
            return self._finish(session)
        q = request.query_params
        fields = "".join(
            f'<label>{label} <input name="{key}" id="e-{key}" value="{esc(q.get(key, ""))}" '
            f'placeholder="{esc(hint)}" size="16"></label> '
            for key, label, hint in (
                ("sandbox", "Sandbox", "name"),
                ("type", "Type", "stopped,failed"),
                ("actor", "Actor", "user"),
                ("since", "Since", "TIME or SEQ"),
            )
        )
        body = (
            f'<h1>Events</h1><form id="filters" method="get" action="/events">{fields}'
            '<button>Follow</button> <a href="/events">clear</a></form>'
            f'<p class="muted">As <code>sandboxctl events --follow</code>: without Since, the last {RECENT_EVENTS} '
            "events, then each as it is appended.</p>"
            '<table id="events"><thead><tr><th>seq</th><th>when</th><th>sandbox</th><th>what</th><th>who</th>'
            '<th>why</th></tr></thead><tbody></tbody></table><p id="live" class="muted">connecting…</p>'
        )
        return self._finish(HTMLResponse(page("events", body, session, "events")), session)

    async def deadletters(self, request: Request) -> Response:
        session = await self._signed_in(request)
        if isinstance(session, Response):
            return self._finish(session)
        try:
            items = await session.client.dead_letters()
        except PermissionDenied:
            body = (
                '<h1>Dead letters</h1><p class="error" id="problem">Reading the dead letters needs the admin role.</p>'
            )
            return self._finish(HTMLResponse(page("dead letters", body, session), 403), session)
        except SandboxError as exc:
            return self._finish(error_response(exc, False, session), session)
        columns = ("stream_seq", "time", "consumer", "subject", "deliveries", "reason")
        rows = "".join(
            "<tr>"
            + "".join(f"<td>{esc(iso(i.get(c)) if c == 'time' else i.get(c, ''))}</td>" for c in columns)
            + "</tr>"
            for i in items
        )
        head = "".join(f"<th>{esc(c)}</th>" for c in columns)
        body = (
            f"<h1>Dead letters</h1><p>{len(items)} message{'s' if len(items) != 1 else ''} a consumer gave up on, "
            f'oldest first.</p><table id="deadletters"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        )
        return self._finish(HTMLResponse(page("dead letters", body, session)), session)

    async def static(self, request: Request) -> Response:
        file = request.path_params["file"]
        kinds = {"console.js": "text/javascript", "console.css": "text/css"}
        if file not in kinds:
            return self._finish(Response("not found", 404))
        return self._finish(Response((STATIC / file).read_bytes(), media_type=kinds[file]))

    # -- commands --------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        """Stop, start or delete one sandbox as the session's user. The command is sent, not
        waited for: the page shows the sandbox move through the log. A role that may not is
        refused by the state machine (403), not here."""
        session = self._session(request)
        if session is None:
            return self._finish(JSONResponse({"error": {"code": "unauthenticated", "message": "sign in"}}, 401))
        token = request.headers.get("x-csrf-token") or (await self._form(request)).get("csrf", "")
        if not self._same_origin(request) or not self._token_ok(token, session):
            body = {"error": {"code": "permission_denied", "message": "missing or wrong token"}}
            return self._finish(JSONResponse(body, 403))
        verb = request.path_params["verb"]
        try:
            name = sandbox_name(request.path_params["name"])
        except SandboxError as exc:
            return self._finish(error_response(exc, True))
        if verb not in VERBS:
            body = {"error": {"code": "invalid_argument", "message": f"no action {verb[:20]!r}"}}
            return self._finish(JSONResponse(body, 404))
        client = session.client
        commands: dict[str, Callable[[str], Awaitable[Any]]] = {
            "stop": client.stop,
            "start": client.start,
            "delete": client.delete,
        }
        try:
            reply = await commands[verb](name)
        except SandboxError as exc:
            return self._finish(error_response(exc, True))
        return self._finish(JSONResponse({"name": name, "verb": verb, "seq": reply.seq}))

    # -- server-sent events -------------------------------------------------------------

    def _stream(self, session: Session, produce: Callable[[asyncio.Queue[Any]], Coroutine[Any, Any, None]]) -> Response:
        """An event stream whose messages ``produce`` puts on a queue (None ends it); a comment
        every KEEPALIVE seconds while it is quiet, so a browser that went away is noticed. It
        ends with its producer: at the end of the session, or of its connection to NATS. Refused
        (429) past STREAMS_PER_SESSION of the session's or STREAMS_MAX in all."""
        if len(session.streams) >= STREAMS_PER_SESSION or self._open_streams() >= STREAMS_MAX:
            refusal = {"error": {"code": "resource_exhausted", "message": "too many event streams open; close some"}}
            return self._finish(JSONResponse(refusal, 429))
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)

        async def body() -> AsyncIterator[str]:
            # Counted again here, with no await between the count and the add: requests made at
            # once all pass the handler's count before any stream has begun.
            if len(session.streams) >= STREAMS_PER_SESSION or self._open_streams() >= STREAMS_MAX:
                yield sse("problem", {"code": "resource_exhausted", "message": "too many event streams open"})
                return
            producer = asyncio.create_task(self._produce(session, produce, queue), name="console-stream")
            session.streams.add(producer)
            getting: asyncio.Future[Any] | None = None
            try:
                while True:
                    getting = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getting, producer}, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED)
                    session.used = time.monotonic()  # a page that only follows is in use
                    if not getting.done():
                        getting.cancel()
                        if producer.done() and queue.empty():
                            return  # the session or its connection ended
                        yield ": keepalive\n\n"
                        continue
                    message = getting.result()
                    if message is None:
                        return
                    yield message
            finally:
                if getting is not None:
                    getting.cancel()
                session.streams.discard(producer)
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)

        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    def _open_streams(self) -> int:
        return sum(len(s.streams) for s in self.sessions.values())

    @staticmethod
    async def _produce(
        session: Session, produce: Callable[[asyncio.Queue[Any]], Coroutine[Any, Any, None]], queue: asyncio.Queue[Any]
    ) -> None:
        """``produce``, ended once the session's connection to NATS is closed (a session ended,
        the console stopping): the SDK's follow would retry on a closed connection for ever."""
        work = asyncio.ensure_future(produce(queue))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=1.0)
                if session.client.nc.is_closed:
                    return
        finally:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)

    @staticmethod
    async def _failing(queue: asyncio.Queue[Any], exc: BaseException) -> None:
        reraise_if_cancelling()
        code = str(exc.code) if isinstance(exc, SandboxError) else "internal"
        message = exc.message if isinstance(exc, SandboxError) else f"{type(exc).__name__}: {exc}"
        await queue.put(sse("problem", {"code": code, "message": message}))
        await queue.put(None)

    async def stream_sandboxes(self, request: Request) -> Response:
        """The table and the counts: a ``snapshot`` (rows that match the filters, counts by phase),
        then, for each event in the log, the sandbox's ``row`` as it is at least at that event
        (``matches``: whether it belongs in the table) and the ``counts`` again."""
        session = self._session(request)
        if session is None:
            return self._finish(JSONResponse({"error": {"code": "unauthenticated", "message": "sign in"}}, 401))
        try:
            filters = Filters.of(request)
        except SandboxError as exc:
            return self._finish(error_response(exc, True))
        client = session.client

        async def counts() -> dict[str, int]:
            summary = await client.summary()
            return {p.value: int(summary["phases"].get(p.value, 0)) for p in Phase if p is not Phase.DELETED}

        async def produce(queue: asyncio.Queue[Any]) -> None:
            try:
                head = await self._head(client)
                client.seen = max(client.seen, head)
                phases = [filters.phase] if filters.phase else []
                items = await client.list(phases, filters.labels, include_deleted=filters.phase == Phase.DELETED.value)
                rows = [row_of(i) for i in items if filters.matches(i)]
                await queue.put(sse("snapshot", {"rows": rows, "counts": await counts(), "seq": head}))
                # Each sandbox that moved and its last sequence, however many events a burst holds.
                moved: dict[str, int] = {}
                more = asyncio.Event()

                async def follow() -> None:
                    async for seq, envelope in client.events(filters.sandbox or None, head + 1, follow=True):
                        moved[envelope.subject] = seq
                        more.set()

                follower = asyncio.create_task(follow(), name="console-follow")
                try:
                    while True:
                        waiting = asyncio.ensure_future(more.wait())
                        await asyncio.wait({waiting, follower}, return_when=asyncio.FIRST_COMPLETED)
                        if not waiting.done():
                            waiting.cancel()
                            await follower  # its failure ends the stream
                            return
                        more.clear()
                        batch = dict(moved)  # a burst is read once per sandbox
                        moved.clear()
                        last = max(batch.values())
                        client.seen = max(client.seen, last)
                        for name in batch:
                            try:
                                item = await client.get(name)
                            except NotFound:
                                continue
                            await queue.put(sse("row", {"row": row_of(item), "matches": filters.matches(item)}))
                        await queue.put(sse("counts", {"counts": await counts(), "seq": last}))
                finally:
                    follower.cancel()
                    await asyncio.gather(follower, return_exceptions=True)
            except Exception as exc:
                await self._failing(queue, exc)

        return self._stream(session, produce)

    async def stream_events(self, request: Request) -> Response:
        """The log's events as ``events --follow`` prints them, with its filters: ``sandbox``,
        ``type`` and ``actor`` (comma-separated), ``since`` (a time or a log sequence; without it,
        the last RECENT_EVENTS events)."""
        session = self._session(request)
        if session is None:
            return self._finish(JSONResponse({"error": {"code": "unauthenticated", "message": "sign in"}}, 401))
        q = request.query_params
        types = [t.strip() for t in q.get("type", "").split(",") if t.strip()]
        actors = [a.strip() for a in q.get("actor", "").split(",") if a.strip()]
        try:
            sandbox = sandbox_name(q.get("sandbox", "")) or None
            since = audit.parse_point(q["since"].strip()) if q.get("since", "").strip() else None
        except ValueError as exc:
            return self._finish(error_response(SandboxError.of(ErrorCode.INVALID_ARGUMENT, str(exc)), True))
        except SandboxError as exc:
            return self._finish(error_response(exc, True))
        client = session.client

        async def produce(queue: asyncio.Queue[Any]) -> None:
            try:
                start = since if isinstance(since, int) else 1
                if since is None and sandbox is None:
                    start = max(1, await self._head(client) - RECENT_EVENTS + 1)
                await queue.put(sse("following", {"from": start}))
                async for seq, envelope in client.events(sandbox, start, follow=True):
                    if audit.selected(seq, envelope, types, actors, since):
                        await queue.put(sse("event", event_of(seq, envelope)))
            except Exception as exc:
                await self._failing(queue, exc)

        return self._stream(session, produce)

    @staticmethod
    async def _head(client: SandboxClient) -> int:
        """The log's last sequence, asked as the session's user (a reader may ask it)."""
        await client.may_read(subjects.LOG_STREAM)
        info = await client.nc.jetstream().stream_info(subjects.LOG_STREAM)
        return int(info.state.last_seq)


TABLE = (
    '<table id="sandboxes"><thead><tr><th>name</th><th>phase</th><th>driver</th><th>host</th><th>labels</th>'
    "<th>updated</th><th>last error</th><th></th></tr></thead><tbody></tbody></table>"
)
