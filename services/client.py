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
from collections.abc import AsyncIterator, Iterable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from events import subjects
from events.commands import (
    AcquireLease,
    CreateSandbox,
    DeleteSandbox,
    PlaceStopHold,
    ReleaseLease,
    ReleaseStopHold,
    RenewLease,
    SandboxCommand,
    StartSandbox,
    StopSandbox,
    TouchSandbox,
)
from events.envelope import Envelope, encode, new_id
from events.replies import ErrorCode, Reply, reply_decoder
from services.log import decode_event
from services.tail import Tail, stream_seq

log = logging.getLogger(__name__)

TERMINAL = {"create": "Ready", "start": "Ready", "stop": "Stopped", "delete": "Deleted"}


class SandboxError(Exception):
    """A rejected command or query; ``code`` is one of events.replies.ErrorCode
    (or ``unavailable``, ``timeout``, ``failed`` from the client itself).

    Catch the subclass for the code you handle: ``except NotFound``.
    """

    code = "internal"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @staticmethod
    def of(code: str, message: str) -> SandboxError:
        """The typed error for ``code``; an unknown code still gives a SandboxError."""
        cls = _BY_CODE.get(code)
        return cls(message) if cls is not None else SandboxError(code, message)


class _Coded(SandboxError):
    def __init__(self, message: str) -> None:
        super().__init__(type(self).code, message)


class InvalidArgument(_Coded):
    code = "invalid_argument"


class NotFound(_Coded):
    code = "not_found"


class AlreadyExists(_Coded):
    code = "already_exists"


class FailedPrecondition(_Coded):
    code = "failed_precondition"


class Conflict(_Coded):
    code = "conflict"


class Internal(_Coded):
    code = "internal"


class PermissionDenied(_Coded):
    """The authenticated user lacks the role (the state machine's refusal, recorded in the audit
    stream), or the NATS server refused a subject the user's permissions do not allow."""

    code = "permission_denied"


class Unavailable(_Coded):
    """No NATS, or no service answered in time. Safe to retry with the same command id."""

    code = "unavailable"


class WaitTimeout(_Coded):
    code = "timeout"


class PhaseFailed(_Coded):
    """The sandbox went to Error while the caller waited for another phase."""

    code = "failed"


_BY_CODE: dict[str, type[_Coded]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Conflict,
        Internal,
        PermissionDenied,
        Unavailable,
        WaitTimeout,
        PhaseFailed,
    )
}


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


class SandboxClient:
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

    @classmethod
    async def connect(
        cls, url: str, actor: str = "client", user: str = "", password: str = "", **options: Any
    ) -> SandboxClient:
        denials = Denials()
        try:
            options.setdefault("error_cb", denials.error_cb)
            options.setdefault("connect_timeout", 2)
            options.setdefault("max_reconnect_attempts", 3)
            options.setdefault("reconnect_time_wait", 0.5)
            if user:
                options.update(user=user, password=password, inbox_prefix=subjects.inbox_prefix(user))
            nc = await nats.connect(url, **options)
        except Exception as exc:
            if "authorization violation" in str(exc).lower():
                raise PermissionDenied(f"NATS at {url} did not accept user {user or '(none)'}: {exc}") from exc
            raise Unavailable(f"cannot reach NATS at {url}: {exc}") from exc
        if user and not nc._server_info.get("auth_required"):
            # A server without users (a leftover credential, or SANDBOXCTL_USER set by habit) takes
            # commands on the plain subjects, with the actor the payload names.
            return cls(nc, actor, denials=denials)
        return cls(nc, user or actor, user=user, denials=denials)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    async def _request(self, subject: str, payload: bytes) -> Reply:
        return reply_decoder.decode((await self._raw_request(subject, payload)).data)

    async def _raw_request(self, subject: str, payload: bytes) -> Msg:
        refused = self.denials.watch(subject)
        request = asyncio.ensure_future(self.nc.request(subject, payload, timeout=self.request_timeout))
        try:
            await asyncio.wait({request, refused}, return_when=asyncio.FIRST_COMPLETED)
            if refused.done() and not request.done():
                request.cancel()
                raise PermissionDenied(f"user {self.user or '(none)'} may not publish to {subject}")
            msg = await request
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(f"no service answers on {subject}; is sandboxctl up running?") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise Unavailable(f"no answer on {subject} within {self.request_timeout}s") from exc
        finally:
            self.denials.forget(subject, refused)
            if not request.done():
                request.cancel()
        return msg

    async def may_read(self, stream: str) -> None:
        """Raise PermissionDenied unless this user may read ``stream``: the server is asked for the
        stream's info, which a user whose role does not cover the stream is refused at once."""
        if not self.user:
            return
        await self._raw_request(f"$JS.API.STREAM.INFO.{stream}", b"")

    async def send(self, command: SandboxCommand) -> Reply:
        """Send one command, retrying while no service answers.

        Every retry carries the same command id, so the log stores the
        command's events once however many attempts reach the service; a
        ``conflict`` (the sandbox kept changing) is retried the same way.
        """
        payload = encode(command)
        for attempt in range(self.retries + 1):
            try:
                reply = await self._request(subjects.command(command.VERB, self.user), payload)
            except Unavailable:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if reply.error is None:
                return reply
            if reply.error.code != ErrorCode.CONFLICT or attempt == self.retries:
                raise SandboxError.of(reply.error.code, reply.error.message)
            await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _meta(self, command_id: str | None) -> dict[str, str]:
        return {"command_id": command_id or new_id(), "actor": self.actor}

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
    ) -> Reply:
        """``idle_timeout``: seconds idle before the reaper stops it (0 never; None, the service's
        default). ``auto_delete_after``: seconds Stopped before the reaper deletes it, workspace
        and all (0, the default, never)."""
        return await self.send(
            CreateSandbox(
                name=name,
                image=image,
                command=command,
                labels=labels or {},
                driver=driver,
                idle_timeout=idle_timeout,
                auto_delete_after=auto_delete_after,
                **self._meta(command_id),
            )
        )

    async def stop(self, name: str, timeout: float = 10.0, command_id: str | None = None, reason: str = "") -> Reply:
        return await self.send(StopSandbox(name=name, timeout=timeout, reason=reason, **self._meta(command_id)))

    async def start(self, name: str, command_id: str | None = None) -> Reply:
        return await self.send(StartSandbox(name=name, **self._meta(command_id)))

    async def delete(self, name: str, command_id: str | None = None) -> Reply:
        return await self.send(DeleteSandbox(name=name, **self._meta(command_id)))

    # -- activity, leases and holds (statemachine/idle.py) ------------------------------

    async def touch(self, name: str, via: str = "touch", command_id: str | None = None) -> Reply:
        """Record use of the sandbox: its idle clock starts again (and a pending stop is cancelled)."""
        return await self.send(TouchSandbox(name=name, via=via, **self._meta(command_id)))

    async def acquire_lease(self, name: str, holder: str, ttl: float, command_id: str | None = None) -> Reply:
        """Keep the sandbox from being auto-stopped for ``ttl`` seconds (acquiring again extends it)."""
        return await self.send(AcquireLease(name=name, holder=holder, ttl=ttl, **self._meta(command_id)))

    async def renew_lease(self, name: str, holder: str, ttl: float, command_id: str | None = None) -> Reply:
        """Extend a live lease to ``ttl`` seconds from now; FailedPrecondition if it has lapsed."""
        return await self.send(RenewLease(name=name, holder=holder, ttl=ttl, **self._meta(command_id)))

    async def release_lease(self, name: str, holder: str, command_id: str | None = None) -> Reply:
        return await self.send(ReleaseLease(name=name, holder=holder, **self._meta(command_id)))

    async def hold(self, name: str, holder: str, reason: str = "", command_id: str | None = None) -> Reply:
        """Place a stop hold: ``start`` fails with FailedPrecondition naming ``holder`` until released."""
        return await self.send(PlaceStopHold(name=name, holder=holder, reason=reason, **self._meta(command_id)))

    async def unhold(self, name: str, holder: str, command_id: str | None = None) -> Reply:
        return await self.send(ReleaseStopHold(name=name, holder=holder, **self._meta(command_id)))

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
        """The sandbox once it is Ready: started first if it is Stopped (or stopping), unless
        ``start`` is False, which raises FailedPrecondition instead."""
        item = await self.get(name)
        phase = item["phase"]
        if phase == "Ready":
            return item
        if phase in ("Provisioning", "Starting"):
            return await self.wait_for(name, "Ready", item["last_seq"], timeout)
        if phase not in ("Stopped", "Stopping"):
            reason = f": {item['last_error']}" if item.get("last_error") else ""
            raise FailedPrecondition(f"sandbox {name} is {phase}{reason}; start it or delete it first")
        if not start:
            raise FailedPrecondition(
                f"sandbox {name} is {phase} and --no-start keeps it that way; "
                f"run sandboxctl start {name}, or leave out --no-start"
            )
        if phase == "Stopping":
            item = await self.wait_for(name, "Stopped", item["last_seq"], timeout)
        reply = await self.start(name)
        return await self.wait_for(name, "Ready", reply.seq, timeout)

    async def query(self, kind: str, **request: Any) -> Any:
        reply = await self._request(subjects.query(kind), msgspec.json.encode(request))
        if reply.error is not None:
            raise SandboxError.of(reply.error.code, reply.error.message)
        return reply.result

    async def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.query("get", name=name)
        return result

    async def list(
        self, phases: Iterable[str] = (), labels: dict[str, str] | None = None, include_deleted: bool = False
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.query(
            "list", phases=list(phases), labels=labels or {}, include_deleted=include_deleted
        )
        return result

    async def history(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.query("history", name=name)
        return result

    async def events(
        self, name: str | None = None, since_seq: int = 1, follow: bool = True
    ) -> AsyncIterator[tuple[int, Envelope]]:
        """The log's events (of one sandbox, or all) from ``since_seq``, in order.

        With ``follow`` it keeps going as the log grows, across reconnects and
        server restarts, without a gap or a repeat; without it, it stops at the
        end of the log as it stood when called.
        """
        await self.may_read(subjects.LOG_STREAM)
        filter_subject = subjects.log(name) if name else subjects.LOG_ALL
        tail = Tail(self.nc.jetstream(), subjects.LOG_STREAM, filter_subject, since_seq, batch=500)
        end = await tail.last_seq()
        try:
            if not follow and tail.next_seq > end:
                return
            async for batch in tail.batches():
                for msg in batch:
                    yield stream_seq(msg), decode_event(msg.data)
                if not follow and tail.next_seq > end:
                    return
        finally:
            await tail.close()

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead-letter record so far (what a consumer gave up on, and why)."""
        return await self._records(subjects.DEADLETTER_STREAM, subjects.DEADLETTER_ALL)

    async def denied_attempts(self) -> list[dict[str, Any]]:
        """Every refused command so far, from the audit stream (admin only)."""
        return await self._records(subjects.AUDIT_STREAM, subjects.AUDIT_ALL)

    async def _records(self, stream: str, filter_subject: str) -> list[dict[str, Any]]:
        await self.may_read(stream)
        js = self.nc.jetstream()
        tail = Tail(js, stream, filter_subject, 1, batch=500)
        out: list[dict[str, Any]] = []
        try:
            end = await tail.last_seq()
        except NotFoundError:  # the audit stream exists only once authorization is on
            return out
        if end == 0:
            return out
        try:
            async for batch in tail.batches():
                out += [msgspec.json.decode(m.data) for m in batch]
                if tail.next_seq > end:
                    return out
        finally:
            await tail.close()
        return out

    async def wait_for(self, name: str, phase: str, after_seq: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the projection shows ``phase`` at or after ``after_seq``.

        Raises PhaseFailed if the sandbox lands in Error instead, WaitTimeout
        if neither happens in time.
        """
        changed = asyncio.Event()
        noticed: list[dict[str, Any]] = []

        async def poke(msg: Any) -> None:
            # A notice carries the row it announces (the projector commits it first); an older
            # projector's notice carries none, and the row is read back with a get.
            try:
                item = json.loads(msg.data).get("item")
            except ValueError:
                item = None
            if isinstance(item, dict):
                noticed.append(item)
            changed.set()

        sub = await self.nc.subscribe(subjects.projected(name), cb=poke)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                changed.clear()
                if noticed:
                    item: dict[str, Any] | None = noticed[-1]
                    noticed.clear()
                else:
                    try:
                        item = await self.get(name)
                    except SandboxError as exc:
                        if exc.code != ErrorCode.NOT_FOUND:
                            raise
                        item = None
                if item is not None and item["last_seq"] >= after_seq:
                    if item["phase"] == phase:
                        return item
                    if item["phase"] == "Error":
                        raise PhaseFailed(f"sandbox {name} is Error: {item['last_error'] or 'no reason recorded'}")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    now_phase = item["phase"] if item else "unknown"
                    raise WaitTimeout(f"sandbox {name} did not reach {phase} within {timeout:g}s (it is {now_phase})")
                try:
                    await asyncio.wait_for(changed.wait(), timeout=min(remaining, 1.0))
                except TimeoutError:
                    pass
        finally:
            await sub.unsubscribe()
