"""The query service: get and list from SQLite, history from the log, over request/reply.

It only reads, so any number of replicas can run beside one projector. A
sandbox's history is its part of the log (one subject), folded for the phase
after each event: the projection keeps no second copy of every event.
Requests and replies are JSON; errors use the same codes as commands.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from events import subjects
from events.envelope import encode
from events.replies import ErrorCode, Reply, error_reply
from services.audit import history
from services.projection import connect, get_sandbox, list_sandboxes
from statemachine.names import validate_name

log = logging.getLogger(__name__)

# A reader of the log retries while JetStream is away; a history request gives up after this.
HISTORY_DEADLINE = 8.0  # under the client's own request timeout (10 s), so the reason reaches it


class GetRequest(msgspec.Struct):
    name: str


class ListRequest(msgspec.Struct):
    phases: list[str] = []
    labels: dict[str, str] = {}
    include_deleted: bool = False


class QueryService:
    def __init__(self, nc: NATS, db_path: Path) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.db_path = db_path
        self._sub: Any = None
        self._pending: set[asyncio.Task[None]] = set()
        self.tasks: list[asyncio.Task[None]] = []  # none long-running: it answers from a subscription

    async def start(self) -> None:
        self.db = await connect(self.db_path)
        self._sub = await self.nc.subscribe(subjects.query("*"), queue="sandboxctl-query", cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.ConnectionClosedError:
                pass
        if self._pending:
            await asyncio.wait(self._pending, timeout=5)
        await self.db.close()

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._respond(msg))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _respond(self, msg: Msg) -> None:
        try:
            reply = await self.handle(msg.subject.rsplit(".", 1)[-1], msg.data)
        except Exception as exc:
            log.exception("query %s failed", msg.subject)
            reply = error_reply(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if msg.reply:
            await msg.respond(encode(reply))

    async def handle(self, kind: str, payload: bytes) -> Reply:
        try:
            if kind in ("get", "history"):
                name = msgspec.json.decode(payload, type=GetRequest).name
                problem = validate_name(name)
                if problem:
                    return error_reply(ErrorCode.INVALID_ARGUMENT, problem)
            if kind == "get":
                item = await get_sandbox(self.db, name)
                if item is None:
                    return error_reply(ErrorCode.NOT_FOUND, f"sandbox {name} not found", name)
                return Reply(accepted=True, sandbox=name, phase=item["phase"], seq=item["last_seq"], result=item)
            if kind == "list":
                req = msgspec.json.decode(payload or b"{}", type=ListRequest)
                items = await list_sandboxes(self.db, req.phases, req.labels, req.include_deleted)
                return Reply(accepted=True, result=items)
            if kind == "history":
                try:
                    events = await asyncio.wait_for(history(self.js, name), HISTORY_DEADLINE)
                except TimeoutError:
                    return error_reply(
                        ErrorCode.INTERNAL, f"history of {name}: the log did not answer in {HISTORY_DEADLINE:g}s", name
                    )
                if not events:
                    return error_reply(ErrorCode.NOT_FOUND, f"sandbox {name} has no history", name)
                return Reply(accepted=True, sandbox=name, result=events)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return error_reply(ErrorCode.INVALID_ARGUMENT, f"malformed query: {exc}")
        return error_reply(ErrorCode.INVALID_ARGUMENT, f"unknown query {kind!r}; use get, list or history")
