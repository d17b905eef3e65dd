"""SandboxClient: the async Python client that the CLI (and other services) use.

It speaks only the wire contract in ``events``. Each method sends one command
with a fresh command id unless given one, so a caller that retries with the
same id can never apply a command twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

from events import subjects
from events.commands import CreateSandbox, DeleteSandbox, SandboxCommand, StartSandbox, StopSandbox
from events.envelope import encode, new_id
from events.replies import ErrorCode, Reply, reply_decoder

log = logging.getLogger(__name__)

TERMINAL = {"create": "Ready", "start": "Ready", "stop": "Stopped", "delete": "Deleted"}


class SandboxError(Exception):
    """A rejected command or query; ``code`` is one of events.replies.ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class WaitTimeout(SandboxError):
    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class PhaseFailed(SandboxError):
    def __init__(self, message: str) -> None:
        super().__init__("failed", message)


async def _quiet(exc: Exception) -> None:
    """nats-py logs every connection error with a traceback; the client reports
    the one that matters as a SandboxError instead."""
    log.debug("nats: %r", exc)


class SandboxClient:
    def __init__(self, nc: NATS, actor: str = "client", request_timeout: float = 10.0) -> None:
        self.nc = nc
        self.actor = actor
        self.request_timeout = request_timeout

    @classmethod
    async def connect(cls, url: str, actor: str = "client", **options: Any) -> SandboxClient:
        try:
            options.setdefault("error_cb", _quiet)
            nc = await nats.connect(
                url, connect_timeout=2, max_reconnect_attempts=3, reconnect_time_wait=0.5, **options
            )
        except Exception as exc:
            raise SandboxError("unavailable", f"cannot reach NATS at {url}: {exc}") from exc
        return cls(nc, actor)

    async def close(self) -> None:
        await self.nc.drain()

    async def _request(self, subject: str, payload: bytes) -> Reply:
        try:
            msg = await self.nc.request(subject, payload, timeout=self.request_timeout)
        except nats.errors.NoRespondersError as exc:
            raise SandboxError("unavailable", f"no service answers on {subject}; is sandboxctl up running?") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise SandboxError("unavailable", f"no answer on {subject} within {self.request_timeout}s") from exc
        return reply_decoder.decode(msg.data)

    async def send(self, command: SandboxCommand) -> Reply:
        reply = await self._request(subjects.command(command.VERB), encode(command))
        if reply.error is not None:
            raise SandboxError(reply.error.code, reply.error.message)
        return reply

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
    ) -> Reply:
        return await self.send(
            CreateSandbox(
                name=name, image=image, command=command, labels=labels or {}, driver=driver, **self._meta(command_id)
            )
        )

    async def stop(self, name: str, timeout: float = 10.0, command_id: str | None = None) -> Reply:
        return await self.send(StopSandbox(name=name, timeout=timeout, **self._meta(command_id)))

    async def start(self, name: str, command_id: str | None = None) -> Reply:
        return await self.send(StartSandbox(name=name, **self._meta(command_id)))

    async def delete(self, name: str, command_id: str | None = None) -> Reply:
        return await self.send(DeleteSandbox(name=name, **self._meta(command_id)))

    async def query(self, kind: str, **request: Any) -> Any:
        reply = await self._request(subjects.query(kind), msgspec.json.encode(request))
        if reply.error is not None:
            raise SandboxError(reply.error.code, reply.error.message)
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

    async def wait_for(self, name: str, phase: str, after_seq: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the projection shows ``phase`` at or after ``after_seq``.

        Raises PhaseFailed if the sandbox lands in Error instead, WaitTimeout
        if neither happens in time.
        """
        changed = asyncio.Event()

        async def poke(_msg: Any) -> None:
            changed.set()

        sub = await self.nc.subscribe(subjects.projected(name), cb=poke)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                changed.clear()
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
