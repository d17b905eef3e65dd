"""SandboxClient: the async Python client that the CLI (and other services) use.

It speaks only the wire contract in ``events``. Each method sends one command
with a fresh command id unless given one, so a caller that retries with the
same id can never apply a command twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Literal

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import sandboxctl.observe.tracing as tracing
from sandboxctl.bus.natsinternals import on_reconnected, server_requires_auth
from sandboxctl.bus.servers import MAX_PINGS_OUT, PING_INTERVAL, server_urls
from sandboxctl.client.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    PhaseFailed,
    SandboxError,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
)
from sandboxctl.events import subjects
from sandboxctl.events.commands import (
    AcquireLease,
    ArchiveSandbox,
    BulkPage,
    BulkSandboxes,
    BulkVerb,
    CloneSandbox,
    CreateSandbox,
    DeleteSandbox,
    PauseSandbox,
    PlaceStopHold,
    RecordCopy,
    ReleaseLease,
    ReleaseStopHold,
    RenewLease,
    ResumeSandbox,
    SandboxCommand,
    StartSandbox,
    StopSandbox,
    TouchSandbox,
    UpdateSandbox,
    bulk_decoder,
    command_decoder,
)
from sandboxctl.events.envelope import Envelope, encode, new_id
from sandboxctl.events.limits import HOST_MAX, HOST_PATTERN, SEQ_MAX
from sandboxctl.events.replies import ErrorCode, Reply, reply_decoder
from sandboxctl.events.spec import Resources
from sandboxctl.statemachine.phases import Phase

log = logging.getLogger(__name__)

# The phase each verb's command leads to, which the CLI waits for.
TERMINAL: dict[str, Phase] = {
    "create": Phase.READY,
    "start": Phase.READY,
    "stop": Phase.STOPPED,
    "pause": Phase.PAUSED,
    "resume": Phase.READY,
    "archive": Phase.ARCHIVED,
    "delete": Phase.DELETED,
}


# Phases from which the phase waited for still comes without another command (by the
# transitions in statemachine/machine.py: the driver's answer to the pending request). Seen
# after the command in any other phase, a sandbox will not get there: the wait ends at once.
_ON_THE_WAY: dict[Phase, frozenset[Phase]] = {
    Phase.READY: frozenset({Phase.PROVISIONING, Phase.STARTING, Phase.RESUMING}),
    Phase.STOPPED: frozenset({Phase.STOPPING}),
    Phase.ARCHIVED: frozenset({Phase.ARCHIVING}),
    Phase.PAUSED: frozenset({Phase.PAUSING}),
    Phase.DELETED: frozenset({Phase.DELETING}),
}
_WHY_NOT: dict[Phase, str] = {
    Phase.DELETING: "it is being deleted",
    Phase.DELETED: "it was deleted",
    Phase.STOPPING: "it is being stopped",
    Phase.STOPPED: "it was stopped",
    Phase.STARTING: "it is being started again",
    Phase.READY: "it was started again",
    Phase.PROVISIONING: "it was deleted and created again",
    Phase.COMPLETED: "its main process exited 0 on its own",
    Phase.PAUSING: "it is being paused",
    Phase.PAUSED: "it was paused",
    Phase.RESUMING: "it is being resumed",
}


def wait_verdict(name: str, target: Phase, after_seq: int, item: dict[str, Any] | None) -> bool | SandboxError:
    """Where a wait for ``target`` stands, given the sandbox's row (None: not projected yet):
    True when it is there, False to keep waiting, or the error that ends the wait because
    ``target`` can no longer come (the sandbox is in Error, or a later command took it elsewhere).

    Only a row at or after ``after_seq`` counts. Another phase ends the wait only at a sequence
    after ``after_seq``, so after the command (or the point the caller named: a sandbox Stopped
    at ``after_seq`` may still be started by hand, which makes it Ready); with ``after_seq`` 0 the
    caller gave no position, and a row in another phase may predate its command: only Error
    ends such a wait early."""
    if item is None or item["last_seq"] < after_seq:
        return False
    phase = Phase(item["phase"])
    if phase is target:
        return True
    if phase is Phase.COMPLETED and (
        target is Phase.STOPPED or (target is Phase.READY and item["last_seq"] > after_seq > 0)
    ):
        # A job's end: nothing runs, as after a stop; and after a create or start, it ran (it
        # was Ready, or completed before its start was reported) and exited 0 on its own.
        return True
    if phase is Phase.ERROR:
        return PhaseFailed(f"sandbox {name} is Error: {item['last_error'] or 'no reason recorded'}")
    on_the_way = _ON_THE_WAY.get(target)
    if after_seq == 0 or item["last_seq"] == after_seq or on_the_way is None or phase in on_the_way:
        return False
    why = _WHY_NOT.get(phase, "a later command moved it")
    return FailedPrecondition(
        f"sandbox {name} is {phase} (log seq {item['last_seq']}, after the command at {after_seq}): {why}, "
        f"so it will not become {target}; see sandboxctl history {name}"
    )


# How many times one request is asked again because the connection moved to another server while
# it waited for the answer.
RESENDS = 3
CLOSE_WAIT = 2.0  # seconds a close waits for what was published to be delivered


class Denials:
    """The NATS server's refusals of this connection's publishes, as they arrive.

    A publish the user's permissions forbid is dropped by the server, which
    says so only asynchronously (``-ERR permissions violation``); a request
    would just time out. Watching for the refusal turns it into an immediate
    PermissionDenied instead of an ``unavailable`` ten seconds later.
    """

    _PATTERN = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)

    def __init__(self) -> None:
        self.subjects: list[str] = []  # lower-cased, as nats-py reports them
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    async def error_cb(self, exc: Exception) -> None:
        match = self._PATTERN.search(str(exc))
        if match is None:
            log.debug("nats: %r", exc)  # nats-py logs these with a traceback; the client reports what matters
            return
        subject = match.group(1).lower()
        self.subjects.append(subject)
        for waiter in self._waiters.pop(subject, []):
            if not waiter.done():
                waiter.set_result(None)

    def watch(self, subject: str) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(subject.lower(), []).append(waiter)
        return waiter

    def forget(self, subject: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(subject.lower(), [])
        if waiter in waiters:
            waiters.remove(waiter)


Rows = list[dict[str, Any]]  # what list and history return (``list`` is a method of the client, too)


def _webhook_row(hook: Any, joined: bool) -> dict[str, Any]:
    """What ``webhook list`` shows of a webhook: everything but its secret."""
    return {
        "id": hook.id,
        "url": hook.url,
        "types": ",".join(hook.types) or "all",
        "after_seq": hook.after_seq,
        "created_at": hook.created_at,
        "created_by": hook.created_by,
        "joined": joined,
    }


def _phase(phase: Phase | str) -> Phase:
    try:
        return Phase(phase)
    except ValueError:
        raise InvalidArgument(
            f"unknown phase {str(phase)[:40]!r}; phases are {', '.join(p.value for p in Phase)}"
        ) from None


def _is_seq(value: object) -> bool:
    """Whether ``value`` (from a notice or a row) can be a position in the log."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= SEQ_MAX


def _row_seq(row: dict[str, Any]) -> int:
    """The log position a row reflects (0 if it carries none that can be one)."""
    seq = row.get("last_seq")
    return seq if isinstance(seq, int) and _is_seq(seq) else 0


def _refuses_login(exc: Exception) -> bool:
    """Whether NATS refused to let this connection in (nats-py words it in more than one way)."""
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


# The queries answered from a projection, whose answers must not go back past what was seen.
_HOST = re.compile(HOST_PATTERN)
MONOTONIC_QUERIES = frozenset({"get", "list", "summary", "hosts"})


class SandboxClient:
    """The Python SDK: commands, queries, waits and the log's events over one NATS connection.

    Each command goes out with a fresh command id unless one is given, and is retried with the
    same id while no service answers, so it is applied at most once; every failure is a typed
    ``SandboxError`` (``except NotFound``). It speaks only the wire contract (sandboxctl.events).

    Its reads never go backwards, whichever query replica answers: it asks each with ``at_least``,
    the highest log sequence it has seen (``seen``: its commands' and its queries' answers), so it
    reads its own writes, and a replica behind that answers ``unavailable`` is asked again."""

    def __init__(
        self,
        nc: NATS,
        actor: str = "client",
        request_timeout: float = 10.0,
        retries: int = 3,
        user: str = "",
        denials: Denials | None = None,
    ) -> None:
        self.nc = nc
        self.actor = actor
        self.request_timeout = request_timeout
        self.retries = retries
        # With a NATS user, commands go on that user's own subjects, and the user is the actor.
        self.user = user
        self.denials = denials or Denials()
        self.seen = 0  # the highest log sequence an answer has shown this client
        self._reconnect: asyncio.Future[None] | None = None  # done when the connection has moved
        on_reconnected(nc, self._reconnected)

    @classmethod
    async def connect(
        cls, url: str, actor: str = "client", user: str = "", password: str = "", **options: Any
    ) -> SandboxClient:
        """Connect to NATS: ``url`` is one server's, or a cluster's comma-separated. Raises
        InvalidArgument for a URL that is not one, Unauthenticated if the server refuses the user
        and password (nats-py only reports that to its error callback, and then says no server is
        available), and Unavailable if no server answers."""
        try:
            servers = server_urls(url)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        denials = Denials()
        refusals: list[Exception] = []
        their_cb = options.pop("error_cb", denials.error_cb)

        async def error_cb(exc: Exception) -> None:
            if _refuses_login(exc):
                refusals.append(exc)
            await their_cb(exc)

        try:
            options.setdefault("connect_timeout", 2)
            options.setdefault("max_reconnect_attempts", 3)
            options.setdefault("reconnect_time_wait", 0.5)
            # A server that stops answering (frozen, or its machine lost) is left for another of the
            # cluster's within seconds; a request in flight is then asked again there (_raw_request).
            options.setdefault("ping_interval", PING_INTERVAL)
            options.setdefault("max_outstanding_pings", MAX_PINGS_OUT)
            if user:
                options.update(user=user, password=password, inbox_prefix=subjects.inbox_prefix(user))
            nc = await nats.connect(servers, error_cb=error_cb, **options)
        except Exception as exc:
            if refusals or _refuses_login(exc):
                who = f"user {user}" if user else "a client without credentials"
                raise Unauthenticated(
                    f"NATS at {url} did not accept {who}: wrong user name or password, or no such user "
                    "(credentials come from SANDBOXCTL_CREDENTIALS, SANDBOXCTL_USER/SANDBOXCTL_PASSWORD "
                    "or <data dir>/auth/credentials)"
                ) from exc
            raise Unavailable(f"cannot reach NATS at {url}: {exc}") from exc
        if user and not server_requires_auth(nc):
            # A server without users (a leftover credential, or SANDBOXCTL_USER set by habit) takes
            # commands on the plain subjects, with the actor the payload names.
            return cls(nc, actor, denials=denials)
        return cls(nc, user or actor, user=user, denials=denials)

    async def close(self) -> None:
        """Close the connection, delivering what was published first, within CLOSE_WAIT seconds.

        A connection the server is dropping (its user removed, the server going) is closed rather
        than waited on: nats-py's drain waits 10 s for a PONG that such a connection never gets,
        and then leaves the connection open."""
        if self.nc.is_closed:
            return
        # Not wait_for: a cancelled drain goes on to its own 10 s flush, and wait_for waits for it.
        draining = asyncio.ensure_future(self.nc.drain())
        try:
            await asyncio.wait({draining}, timeout=CLOSE_WAIT)
            if draining.done() and not draining.cancelled() and draining.exception() is not None:
                log.debug("closing at once, not drained: %r", draining.exception())
        finally:
            if not self.nc.is_closed:
                await self.nc.close()
            draining.cancel()  # with the connection closed, what is left of it ends at once
            with contextlib.suppress(BaseException):
                await draining

    async def _request(self, subject: str, payload: bytes) -> Reply:
        data = (await self._raw_request(subject, payload)).data
        try:
            return reply_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # a service of another version, or none
            raise Internal(f"unreadable reply on {subject}: {exc}") from None

    async def _raw_request(self, subject: str, payload: bytes) -> Msg:
        """One request. Raises Unavailable with ``maybe_delivered`` set when the request went out and
        no answer came (a service may have acted on it), unset when it certainly reached no one."""
        refused = self.denials.watch(subject)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        headers: dict[str, str] = {}
        tracing.inject(headers)  # the caller's trace goes on in the services (observe.tracing)
        request = asyncio.ensure_future(
            self.nc.request(subject, payload, timeout=self.request_timeout, headers=headers or None)
        )
        try:
            for resent in range(RESENDS + 1):
                moved = self._moved()
                pending: set[asyncio.Future[Any]] = {request, refused}
                if resent < RESENDS:
                    pending.add(moved)
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if refused.done() and not request.done():
                    request.cancel()
                    raise PermissionDenied(f"user {self.user or '(none)'} may not publish to {subject}")
                if request.done() or not moved.done() or resent == RESENDS:
                    break
                # The connection left its server while this waited: an answer from there is lost
                # with it (a frozen node). Asked again on the new one, within the same deadline;
                # a command carries the same id, so one the service took is answered its outcome.
                request.cancel()
                left = max(deadline - loop.time(), 0.001)
                request = asyncio.ensure_future(
                    self.nc.request(subject, payload, timeout=left, headers=headers or None)
                )
            msg = await request
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(f"no service answers on {subject}; is sandboxctl up running?") from exc
        except nats.errors.MaxPayloadError as exc:
            raise InvalidArgument(
                f"the request is {len(payload)} bytes, over the server's {self.nc.max_payload}-byte max payload"
            ) from exc
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionDrainingError,
            nats.errors.OutboundBufferLimitError,
        ) as exc:
            raise Unavailable(f"the connection to NATS is gone ({type(exc).__name__}); nothing was sent") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise Unavailable(f"no answer on {subject} within {self.request_timeout:g}s", maybe_delivered=True) from exc
        finally:
            self.denials.forget(subject, refused)
            if not request.done():
                request.cancel()
        return msg

    def _moved(self) -> asyncio.Future[None]:
        """A future done once the connection has connected again, to another server or the same."""
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_future()
        return self._reconnect

    async def _reconnected(self) -> None:
        if self._reconnect is not None and not self._reconnect.done():
            self._reconnect.set_result(None)

    async def may_read(self, stream: str) -> None:
        """Raise PermissionDenied unless this user may read ``stream``: the server is asked for the
        stream's info, which a user whose role does not cover the stream is refused at once."""
        if not self.user:
            return
        await self._raw_request(f"$JS.API.STREAM.INFO.{stream}", b"")

    async def send(self, command: SandboxCommand | BulkSandboxes) -> Reply:
        """Send one command; retry while no service answers, the state machine cannot write the log
        (``unavailable``), could not learn whether it wrote it (``outcome_unknown``) or the sandbox
        keeps changing (``conflict``).

        A command outside the wire contract's bounds (events/commands.py) raises InvalidArgument
        before anything is sent. Every retry carries the same command id, so the log stores the
        command's events once however many attempts reach the service. When the last attempt
        fails and some attempt went out unanswered, the command may have been applied:
        OutcomeUnknown, with the command id to look it up, never Unavailable (which promises that
        nothing was done).
        """
        payload = encode(command)
        try:
            (bulk_decoder if isinstance(command, BulkSandboxes) else command_decoder).decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidArgument(f"{command.VERB} {command.name[:80]}: {exc}") from None
        expected_seq = None if isinstance(command, BulkSandboxes) else command.expected_seq
        subject = subjects.command(command.VERB, self.user)
        with tracing.sending(f"send {command.VERB}", **tracing.about(subject), **{"sandboxctl.sandbox": command.name}):
            return await self._send(command, subject, payload, expected_seq)

    async def _send(
        self, command: SandboxCommand | BulkSandboxes, subject: str, payload: bytes, expected_seq: int | None
    ) -> Reply:
        unanswered: SandboxError | None = None  # the first attempt that may have been applied
        for attempt in range(self.retries + 1):
            try:
                reply = await self._request(subject, payload)
            except Unavailable as exc:
                unanswered = unanswered or (exc if exc.maybe_delivered else None)
                error: SandboxError = exc
                pause = 0.2 * 2**attempt
            else:
                if reply.error is None:
                    self.seen = max(self.seen, reply.seq)
                    return reply
                error = SandboxError.of(reply.error.code, reply.error.message, reply.seq)
                if reply.error.code == ErrorCode.CONFLICT and expected_seq is not None:
                    raise error  # the sandbox moved past what the caller read: only the caller can decide again
                if reply.error.code == ErrorCode.CONFLICT:
                    pause = 0.05 * 2**attempt
                elif reply.error.code == ErrorCode.UNAVAILABLE:  # the log is away: nothing was stored
                    pause = 0.2 * 2**attempt
                elif reply.error.code == ErrorCode.OUTCOME_UNKNOWN:
                    # The log did not confirm an append (a leader lost mid-write): asked again under
                    # the same id, which finds what was stored or stores it, once.
                    unanswered = unanswered or error
                    pause = 0.2 * 2**attempt
                else:
                    raise error
            if attempt < self.retries:
                await asyncio.sleep(pause)
        if unanswered is not None:
            raise OutcomeUnknown(
                f"{command.VERB} {command.name} was sent and its outcome is unknown ({unanswered.message}): "
                f"it may have been accepted. Its command id is {command.command_id}: sandboxctl history "
                f"{command.name} shows its events (causationid), and a retry with that id is applied at most once",
                command.command_id,
            ) from error
        raise error

    def _meta(self, command_id: str | None, expected_seq: int | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"command_id": command_id or new_id(), "actor": self.actor}
        if expected_seq is not None:
            meta["expected_seq"] = expected_seq
        return meta

    async def create(
        self,
        name: str,
        image: str,
        command: list[str] | None = None,
        labels: dict[str, str] | None = None,
        driver: str = "",
        command_id: str | None = None,
        idle_timeout: float | None = None,
        auto_delete_after: float = 0.0,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
        expected_seq: int | None = None,
        idle_action: Literal["stop", "pause"] = "stop",
        auto_archive_after: float = 0.0,
        host: str = "",
        constraints: dict[str, str] | None = None,
    ) -> Reply:
        """``idle_timeout``: seconds idle before the reaper stops it (0 never; None, the service's
        default). ``auto_delete_after``: seconds Stopped before the reaper deletes it, workspace
        and all (0, the default, never). ``auto_archive_after``: seconds Stopped before the reaper
        archives it (0, the default, never); a start restores it. ``resources``: limits the engine
        enforces. ``env``: the environment of its processes, written to the log in clear (never
        secrets). ``host``: run it on this host only; ``constraints``: on a host whose labels carry
        each pair (default: the host with the most room; the one chosen is in its ``host``).

        ``expected_seq`` (on every command that changes a sandbox): act only if the sandbox is
        still at this log sequence, its ``last_seq`` as read (0 for a name never used); else
        Conflict, whose ``seq`` is where it stands now, and nothing is done."""
        return await self.send(
            CreateSandbox(
                name=name,
                image=image,
                command=command,
                labels=labels or {},
                driver=driver,
                idle_timeout=idle_timeout,
                auto_delete_after=auto_delete_after,
                resources=resources or Resources(),
                env=env or {},
                idle_action=idle_action,
                auto_archive_after=auto_archive_after,
                host=host,
                constraints=constraints or {},
                **self._meta(command_id, expected_seq),
            )
        )

    async def clone(
        self,
        source: str,
        name: str,
        image: str = "",
        command: list[str] | None = None,
        labels: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        resources: Resources | None = None,
        idle_timeout: float | None = None,
        idle_action: Literal["stop", "pause"] | None = None,
        command_id: str | None = None,
        expected_seq: int | None = None,
    ) -> Reply:
        """Create ``name`` with a copy of ``source``'s workspace and what it is made of (image,
        command, resources, env, labels, idle settings), each given field overriding the source's
        (labels and env merged over its). The source may be Stopped, Paused or Ready; a Ready one
        is paused for the copy and resumed. Waits like ``create``: ``wait_for(name, READY, seq)``."""
        return await self.send(
            CloneSandbox(
                name=name,
                source=source,
                image=image,
                command=command,
                labels=labels or {},
                env=env or {},
                resources=resources or Resources(),
                idle_timeout=idle_timeout,
                idle_action=idle_action,
                **self._meta(command_id, expected_seq),
            )
        )

    async def stop(
        self,
        name: str,
        timeout: float = 10.0,
        command_id: str | None = None,
        reason: str = "",
        expected_seq: int | None = None,
    ) -> Reply:
        return await self.send(
            StopSandbox(name=name, timeout=timeout, reason=reason, **self._meta(command_id, expected_seq))
        )

    async def start(self, name: str, command_id: str | None = None, expected_seq: int | None = None) -> Reply:
        return await self.send(StartSandbox(name=name, **self._meta(command_id, expected_seq)))

    async def bulk(
        self,
        verb: BulkVerb,
        selector: dict[str, str] | None = None,
        all: bool = False,
        timeout: float = 10.0,
        reason: str = "",
        command_id: str | None = None,
        host: str = "",
    ) -> AsyncIterator[BulkPage]:
        """``verb`` for every sandbox carrying each label of ``selector`` (or, with ``all``, every
        one; with ``host``, of those on that host) in a phase the verb is for, as one command the
        state machine fans out: its pages,
        each the outcome of every sandbox it took in. The same ``command_id`` sent again (a retry)
        acts on no sandbox twice."""
        meta = self._meta(command_id)
        after = ""
        while True:
            reply = await self.send(
                BulkSandboxes(
                    verb=verb,
                    selector=selector or {},
                    all=all,
                    host=host,
                    timeout=timeout,
                    reason=reason,
                    after=after,
                    **meta,
                )
            )
            page = msgspec.convert(reply.result, BulkPage)
            yield page
            if not page.next:
                return
            after = page.next

    async def pause(
        self, name: str, command_id: str | None = None, reason: str = "", expected_seq: int | None = None
    ) -> Reply:
        """Freeze the sandbox's processes: memory kept, CPU freed (phase Paused). ``resume`` thaws them."""
        return await self.send(PauseSandbox(name=name, reason=reason, **self._meta(command_id, expected_seq)))

    async def archive(self, name: str, command_id: str | None = None, expected_seq: int | None = None) -> Reply:
        """Move a Stopped sandbox's workspace into the object store and free its volume (phase
        Archived); ``start`` restores it first."""
        return await self.send(ArchiveSandbox(name=name, **self._meta(command_id, expected_seq)))

    async def resume(self, name: str, command_id: str | None = None, expected_seq: int | None = None) -> Reply:
        return await self.send(ResumeSandbox(name=name, **self._meta(command_id, expected_seq)))

    async def delete(self, name: str, command_id: str | None = None, expected_seq: int | None = None) -> Reply:
        return await self.send(DeleteSandbox(name=name, **self._meta(command_id, expected_seq)))

    async def update(
        self,
        name: str,
        resources: Resources | None = None,
        labels: dict[str, str] | None = None,
        remove_labels: list[str] | None = None,
        idle_timeout: float | None = None,
        command_id: str | None = None,
        expected_seq: int | None = None,
        idle_action: Literal["stop", "pause"] | None = None,
    ) -> Reply:
        """Change a sandbox: the limits ``resources`` names (only while it is Stopped, Completed or
        in Error: the next start makes its container again with them, on the same workspace), the
        ``labels`` to set and ``remove_labels`` to drop, its ``idle_timeout`` (0: never). An update
        that changes nothing appends nothing (``appended`` 0)."""
        return await self.send(
            UpdateSandbox(
                name=name,
                resources=resources or Resources(),
                labels=labels or {},
                remove_labels=remove_labels or [],
                idle_timeout=idle_timeout,
                idle_action=idle_action,
                **self._meta(command_id, expected_seq),
            )
        )

    # -- activity, leases and holds (statemachine/idle.py) ------------------------------

    async def touch(
        self, name: str, via: str = "touch", command_id: str | None = None, expected_seq: int | None = None
    ) -> Reply:
        """Record use of the sandbox: its idle clock starts again (and a pending stop is cancelled)."""
        return await self.send(TouchSandbox(name=name, via=via, **self._meta(command_id, expected_seq)))

    async def acquire_lease(
        self, name: str, holder: str, ttl: float, command_id: str | None = None, expected_seq: int | None = None
    ) -> Reply:
        """Keep the sandbox from being auto-stopped for ``ttl`` seconds (acquiring again extends it)."""
        return await self.send(AcquireLease(name=name, holder=holder, ttl=ttl, **self._meta(command_id, expected_seq)))

    async def renew_lease(
        self, name: str, holder: str, ttl: float, command_id: str | None = None, expected_seq: int | None = None
    ) -> Reply:
        """Extend a live lease to ``ttl`` seconds from now; FailedPrecondition if it has lapsed."""
        return await self.send(RenewLease(name=name, holder=holder, ttl=ttl, **self._meta(command_id, expected_seq)))

    async def release_lease(
        self, name: str, holder: str, command_id: str | None = None, expected_seq: int | None = None
    ) -> Reply:
        return await self.send(ReleaseLease(name=name, holder=holder, **self._meta(command_id, expected_seq)))

    async def hold(
        self, name: str, holder: str, reason: str = "", command_id: str | None = None, expected_seq: int | None = None
    ) -> Reply:
        """Place a stop hold: ``start`` fails with FailedPrecondition naming ``holder`` until released."""
        return await self.send(
            PlaceStopHold(name=name, holder=holder, reason=reason, **self._meta(command_id, expected_seq))
        )

    async def unhold(
        self, name: str, holder: str, command_id: str | None = None, expected_seq: int | None = None
    ) -> Reply:
        return await self.send(ReleaseStopHold(name=name, holder=holder, **self._meta(command_id, expected_seq)))

    async def record_copy(
        self, name: str, direction: Literal["in", "out"], path: str, size: int, command_id: str | None = None
    ) -> Reply:
        """Record in the log a copy made into (``in``) or out of (``out``) the sandbox at ``path``."""
        return await self.send(
            RecordCopy(name=name, direction=direction, path=path, size=size, **self._meta(command_id))
        )

    @contextlib.asynccontextmanager
    async def lease(self, name: str, holder: str, ttl: float = 60.0) -> AsyncIterator[None]:
        """Hold a lease for the length of a ``with`` block, renewed at a third of its ttl, so a
        caller that dies leaves a lease that lapses on its own within ``ttl``."""
        await self.acquire_lease(name, holder, ttl)

        async def renew() -> None:
            while True:
                await asyncio.sleep(ttl / 3)
                try:
                    await self.renew_lease(name, holder, ttl)
                except FailedPrecondition:
                    await self.acquire_lease(name, holder, ttl)  # lapsed while we were slow: take it again

        renewer = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            try:
                await self.release_lease(name, holder)
            except SandboxError as exc:  # deleted meanwhile, say: nothing left to release
                log.debug("releasing lease %s on %s: %s", holder, name, exc)

    async def ensure_running(self, name: str, start: bool = True, timeout: float = 120.0) -> dict[str, Any]:
        """The sandbox once it is Ready: started first if it is Stopped (or stopping), resumed
        first if it is Paused, unless ``start`` is False, which raises FailedPrecondition instead."""
        item = await self.get(name)
        phase = Phase(item["phase"])
        if phase is Phase.READY:
            return item
        if phase in (Phase.PROVISIONING, Phase.STARTING, Phase.RESUMING):
            return await self.wait_for(name, Phase.READY, item["last_seq"], timeout)
        if phase in (Phase.PAUSING, Phase.PAUSED):
            if not start:
                raise FailedPrecondition(
                    f"sandbox {name} is {phase} and --no-start keeps it that way; run sandboxctl resume {name}"
                )
            if phase is Phase.PAUSING:
                item = await self.wait_for(name, Phase.PAUSED, item["last_seq"], timeout)
            reply = await self.resume(name)
            return await self.wait_for(name, Phase.READY, reply.seq, timeout)
        if phase not in (Phase.STOPPED, Phase.STOPPING):
            reason = f": {item['last_error']}" if item.get("last_error") else ""
            raise FailedPrecondition(f"sandbox {name} is {phase}{reason}; start it or delete it first")
        if not start:
            raise FailedPrecondition(
                f"sandbox {name} is {phase} and --no-start keeps it that way; "
                f"run sandboxctl start {name}, or leave out --no-start"
            )
        if phase is Phase.STOPPING:
            item = await self.wait_for(name, Phase.STOPPED, item["last_seq"], timeout)
        reply = await self.start(name)
        return await self.wait_for(name, Phase.READY, reply.seq, timeout)

    async def query(self, kind: str, **request: Any) -> Any:
        """One query; ``get``, ``list`` and ``summary`` are asked for at least what this client has
        seen. A query changes nothing, so while no replica answers, or the one that does is behind
        (``unavailable``), it is asked again, up to ``retries`` times."""
        if kind in MONOTONIC_QUERIES:
            request["at_least"] = max(self.seen, request.get("at_least", 0))
        payload = msgspec.json.encode(request)
        for attempt in range(self.retries + 1):
            try:
                reply = await self._request(subjects.query(kind), payload)
            except Unavailable:
                if attempt == self.retries:
                    raise
            else:
                if reply.error is None:
                    self.seen = max(self.seen, reply.position)
                    return reply.result
                if reply.error.code != ErrorCode.UNAVAILABLE or attempt == self.retries:
                    raise SandboxError.of(reply.error.code, reply.error.message)
            await asyncio.sleep(min(0.1 * 2**attempt, 1.0))

    async def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.query("get", name=name)
        return result

    async def _pages(self, kind: str, start: Any, **request: Any) -> AsyncIterator[Rows]:
        """The pages of a paged query (``list``, ``history``), following ``next`` from ``start``
        until the service says there is no more. A cursor that does not move on is the service's
        bug, and raises Internal rather than asking for the same page for ever."""
        after = start
        while True:
            result = await self.query(kind, **request, after=after)
            if isinstance(result, list):  # a query service from before pages: everything at once
                yield result
                return
            yield result["items"]
            following = result["next"]
            if not following:
                return
            if following <= after:
                raise Internal(f"the {kind} query returned cursor {following!r} after {after!r}: it does not move on")
            after = following

    def list_pages(
        self,
        phases: Iterable[Phase | str] = (),
        labels: dict[str, str] | None = None,
        include_deleted: bool = False,
        limit: int | None = None,
        host: str = "",
    ) -> AsyncIterator[Rows]:
        """The sandboxes page by page, in name order, for callers with many: each page is one reply,
        at most ``limit`` rows (the service's default when None) and never over NATS's max
        payload. ``phases``: rows in one of these; none, every phase but Deleted unless
        ``include_deleted``. ``labels``: rows carrying all of them. ``host``: rows placed there.

        Pages are read one at a time, not as one snapshot: a sandbox created or deleted while
        they are read may or may not be in them, and none comes twice."""
        request: dict[str, Any] = {
            "phases": [_phase(p).value for p in phases],
            "labels": labels or {},
            "include_deleted": include_deleted,
            "host": host,
        }
        if limit is not None:
            request["limit"] = limit
        return self._pages("list", "", **request)

    async def list(
        self,
        phases: Iterable[Phase | str] = (),
        labels: dict[str, str] | None = None,
        include_deleted: bool = False,
        host: str = "",
    ) -> Rows:
        """Every sandbox that matches (see list_pages), however many pages that takes."""
        return [item async for page in self.list_pages(phases, labels, include_deleted, host=host) for item in page]

    async def drain(self, host: str, draining: bool = True) -> None:
        """Place no new sandbox on ``host`` (its sandboxes stay where they are), or, with
        ``draining`` False, place them there again. NotFound for a host never announced."""
        if not _HOST.fullmatch(host) or not host:
            raise InvalidArgument(f"host {host[:80]!r}: 1-{HOST_MAX} letters, digits, '-' or '_'")
        from sandboxctl.bus.hosts import announced, drain, drain_key, key_subject  # only for drain

        js = self.nc.jetstream()
        try:
            known = await announced(js, host)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError) as exc:
            raise Unavailable(f"the hosts' bucket did not answer: {exc!r}") from exc
        if not known:
            raise NotFound(f"no host {host[:80]} is announced (sandboxctl hosts lists them)")
        subject = key_subject(drain_key(host))
        refused = self.denials.watch(subject)
        work = asyncio.ensure_future(drain(js, host, draining))
        try:
            # Only an admin may: the server drops anyone else's write and says so on the side, where
            # the write itself would only time out.
            await asyncio.wait({work, refused}, return_when=asyncio.FIRST_COMPLETED)
            if refused.done() and not work.done():
                raise PermissionDenied(f"user {self.user or '(none)'} may not drain hosts (admin only)")
            await work
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError) as exc:
            raise Unavailable(f"the hosts' bucket did not answer ({exc!r}): {host} may or may not be drained") from exc
        finally:
            self.denials.forget(subject, refused)
            work.cancel()

    async def webhooks(self) -> Rows:
        """Every webhook (admin only): its id, URL, event types, the log position it was added at,
        who added it and when, and whether the relay has joined it. Never its secret."""
        from sandboxctl.bus.webhooks import webhooks

        await self.may_read(subjects.WEBHOOKS_STREAM)
        try:
            hooks, joined = await webhooks(self.nc.jetstream())
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError) as exc:
            raise Unavailable(f"the webhooks' bucket did not answer: {exc!r}") from exc
        return [_webhook_row(h, h.id in joined) for h in sorted(hooks.values(), key=lambda h: (h.created_at, h.id))]

    async def add_webhook(self, url: str, types: Iterable[str], secret: str) -> dict[str, Any]:
        """Add a webhook (admin only) that gets the log's events from now on, those of ``types``
        (``events --type`` patterns; none: all), signed with ``secret``. Returns its row."""
        import secrets as tokens
        from datetime import UTC, datetime

        from sandboxctl.bus.webhooks import add_webhook, webhooks_bucket
        from sandboxctl.events.lifecycle import EVENT_TYPES
        from sandboxctl.events.webhooks import SECRET_MAX, SECRET_MIN, Webhook, types_problem, url_problem

        types = [t.strip() for t in types if t.strip()]
        problem = url_problem(url) or types_problem(types, [*EVENT_TYPES])
        if not problem and not SECRET_MIN <= len(secret) <= SECRET_MAX:
            problem = f"the secret must be {SECRET_MIN} to {SECRET_MAX} characters, not {len(secret)}"
        if problem:
            raise InvalidArgument(f"webhook: {problem}")
        await self.may_read(subjects.WEBHOOKS_STREAM)
        js = self.nc.jetstream()
        try:
            head = (await js.stream_info(subjects.LOG_STREAM)).state.last_seq
            hook = Webhook(
                id=tokens.token_hex(6),
                url=url,
                types=types,
                secret=secret,
                after_seq=head,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                created_by=self.actor or self.user,
            )
            await add_webhook(await webhooks_bucket(js), hook)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError) as exc:
            raise Unavailable(
                f"the webhooks' bucket did not answer ({exc!r}): the webhook may or may not be added"
            ) from exc
        return _webhook_row(hook, False)

    async def remove_webhook(self, hook_id: str) -> None:
        """Remove a webhook (admin only); NotFound if there is none of that id."""
        from sandboxctl.bus.webhooks import remove_webhook, webhooks_bucket
        from sandboxctl.events.webhooks import ID_PATTERN

        if not re.fullmatch(ID_PATTERN, hook_id):
            raise InvalidArgument(f"webhook id {hook_id[:80]!r}: 12 hexadecimal digits, as webhook list shows")
        await self.may_read(subjects.WEBHOOKS_STREAM)
        try:
            removed = await remove_webhook(await webhooks_bucket(self.nc.jetstream()), hook_id)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError) as exc:
            raise Unavailable(
                f"the webhooks' bucket did not answer ({exc!r}): {hook_id} may or may not be removed"
            ) from exc
        if not removed:
            raise NotFound(f"no webhook {hook_id} (sandboxctl webhook list lists them)")

    async def hosts(self) -> Rows:
        """Every host announced, in name order: its announcement (engines, capacity, labels), how
        many sandboxes are placed on it and running there, seconds since its last heartbeat, and
        its state: ``ready``, ``draining`` (nothing new is placed there), or ``lost`` once its
        heartbeat window has passed."""
        rows: Rows = (await self.query("hosts"))["hosts"]
        return rows

    async def summary(self) -> dict[str, Any]:
        """What ``sandboxctl top`` shows, in one bounded reply: ``phases``, how many sandboxes are in
        each phase (every phase named, Deleted too); ``errors``, the most recent ones in Error
        (``name``, ``last_error``, ``updated_at``), at most the query service's SUMMARY_ERRORS."""
        result: dict[str, Any] = await self.query("summary")
        return result

    async def history(self, name: str) -> Rows:
        """Every event of the sandbox, with the phase after each, however many pages that takes."""
        return [item async for page in self._pages("history", 0, name=name) for item in page]

    async def events(
        self, name: str | None = None, since_seq: int = 1, follow: bool = True
    ) -> AsyncIterator[tuple[int, Envelope]]:
        """The log's events (of one sandbox, or all) from ``since_seq``, in order.

        With ``follow`` it keeps going as the log grows, across reconnects and
        server restarts, without a gap or a repeat; without it, it stops at the
        end of the log as it stood when called.
        """
        from sandboxctl.bus.eventlog import decode_event  # the log's readers alone pay for its decoding
        from sandboxctl.bus.reading import read_log
        from sandboxctl.bus.tail import Tail, stream_seq

        await self.may_read(subjects.LOG_STREAM)
        js = self.nc.jetstream()
        if not follow:
            async for batch in read_log(js, name, since_seq):
                for msg in batch:
                    yield stream_seq(msg), decode_event(msg.data)
            return
        tail = Tail(js, subjects.LOG_STREAM, subjects.log(name) if name else subjects.LOG_ALL, since_seq, batch=500)
        try:
            async for batch in tail.batches():
                for msg in batch:
                    yield stream_seq(msg), decode_event(msg.data)
        finally:
            await tail.close()

    async def dead_letters(self) -> Rows:
        """Every dead-letter record so far (what a consumer gave up on, and why)."""
        return await self._records(subjects.DEADLETTER_STREAM, subjects.DEADLETTER_ALL)

    async def denied_attempts(self) -> Rows:
        """Every refused command so far, from the audit stream (admin only)."""
        return await self._records(subjects.AUDIT_STREAM, subjects.AUDIT_ALL)

    async def _records(self, stream: str, filter_subject: str) -> Rows:
        from sandboxctl.bus.reading import read_stream

        await self.may_read(stream)
        return [
            msgspec.json.decode(m.data)
            async for batch in read_stream(self.nc.jetstream(), stream, filter_subject)
            for m in batch
        ]

    async def wait_for(
        self,
        name: str,
        phase: Phase | str,
        after_seq: int = 0,
        timeout: float = 60.0,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Wait until the projection shows ``phase`` at or after ``after_seq`` (a command's reply.seq),
        and return the row.

        Ends as soon as the phase can no longer come (see wait_verdict): PhaseFailed if the sandbox
        lands in Error, FailedPrecondition if a later command took it elsewhere (a start waiting
        for Ready while a delete or a stop came after it). A wait for Deleted that finds the name
        live again looks in the log: if the sandbox was deleted and then created again, the wait
        is over, and the row returned is the new sandbox's. WaitTimeout if none of this happens in
        ``timeout`` seconds. ``on_change`` is given each row looked at on the way (a progress
        display shows the phases the sandbox passes through).
        """
        target = _phase(phase)
        changed = asyncio.Event()
        noticed: list[dict[str, Any]] = []
        floor = 0  # the log position the last notice without its row announced
        newest = 0  # the log position of the newest row taken

        async def poke(msg: Any) -> None:
            # A notice carries the row it announces, sent while the projector commits it; one of a
            # row too large to carry (or an older projector's) carries none, and the row is read
            # back with a get that waits for the commit (``at_least`` the notice's position).
            nonlocal floor
            try:
                notice = json.loads(msg.data)
            except ValueError:
                notice = None
            item = notice.get("item") if isinstance(notice, dict) else None
            if isinstance(item, dict):
                noticed.append(item)
            elif isinstance(notice, dict) and _is_seq(notice.get("seq")):
                floor = max(floor, notice["seq"])
            changed.set()

        sub = await self.nc.subscribe(subjects.projected(name), cb=poke)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                changed.clear()
                if noticed:  # the newest: replicas' projectors each send theirs, a lagging one late
                    item: dict[str, Any] | None = max(noticed, key=_row_seq)
                    noticed.clear()
                else:
                    try:
                        item = await self.query("get", name=name, at_least=floor)
                    except NotFound:
                        item = None
                stale = item is not None and _row_seq(item) < newest  # older than one shown already
                if item is not None and not stale:
                    newest = _row_seq(item)
                    # What the wait saw, this client's reads see from now on, from any replica.
                    self.seen = max(self.seen, newest)
                    if on_change is not None:
                        on_change(item)
                verdict = False if stale else wait_verdict(name, target, after_seq, item)
                if verdict is True:
                    assert item is not None
                    return item
                if isinstance(verdict, SandboxError):
                    if target is Phase.DELETED and item is not None and await self._deleted_since(name, after_seq):
                        return item
                    raise verdict
                remaining = deadline - loop.time()
                if remaining <= 0:
                    now_phase = item["phase"] if item else "unknown"
                    raise WaitTimeout(f"sandbox {name} did not reach {target} within {timeout:g}s (it is {now_phase})")
                try:
                    await asyncio.wait_for(changed.wait(), timeout=min(remaining, 1.0))
                except TimeoutError:
                    pass
        finally:
            await sub.unsubscribe()

    async def _deleted_since(self, name: str, seq: int) -> bool:
        """Whether the log holds a Deleted event of ``name`` after ``seq``."""
        from sandboxctl.events.lifecycle import SandboxDeleted

        async for _, envelope in self.events(name, since_seq=seq + 1, follow=False):
            if isinstance(envelope.data, SandboxDeleted):
                return True
        return False
