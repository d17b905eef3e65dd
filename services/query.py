"""The query service: get, list and summary from SQLite, history from the log, over request/reply.

It only reads, so any number of replicas can run beside one projector. A
sandbox's history is its part of the log (one subject), folded for the phase
after each event: the projection keeps no second copy of every event.
Requests and replies are JSON; errors use the same codes as commands.

Every request is answered, and every answer fits in one NATS message:

- ``list`` and ``history`` answer in pages, ``{"items": [...], "next": CURSOR}``.
  A page holds at most ``limit`` items (PAGE_LIMIT_DEFAULT when the request
  names none, never more than PAGE_LIMIT_MAX) and is cut before its encoding
  would pass the connection's max payload less REPLY_MARGIN, however many
  sandboxes there are and however large their rows. ``next`` is the cursor of
  the following page (``after`` in the next request): for ``list`` the last
  name of this page (rows are ordered by name, the primary key), for
  ``history`` the last log sequence; ``""`` and ``0`` when there is no more.
  A row too large for a page of its own (only a log written outside the
  bounds of events/limits.py makes one) is listed as its identity and phase
  with ``"truncated": true``.
- ``summary`` is what ``sandboxctl top`` shows: sandboxes per phase and the
  most recent ones in Error, bounded, whatever the number of sandboxes.
- A reply that cannot be sent (too large, or refused by the connection) is
  replaced by an ``internal`` error reply that can: a query never times out
  because its answer was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from sandboxctl.bus.eventlog import last_subject_seq
from sandboxctl.bus.hosts import HostsView
from sandboxctl.bus.natsinternals import settle
from sandboxctl.bus.reading import history
from sandboxctl.events import subjects
from sandboxctl.events.envelope import encode
from sandboxctl.events.limits import REASON_MAX
from sandboxctl.events.queries import (
    GetRequest,
    HistoryPage,
    HistoryRequest,
    HostCount,
    HostList,
    HostRow,
    HostsRequest,
    HostState,
    InError,
    ListPage,
    ListRequest,
    Summary,
    SummaryRequest,
)
from sandboxctl.events.replies import ErrorCode, Reply, error_reply
from sandboxctl.services.projection import (
    checkpoint,
    connect,
    encoded_row,
    get_sandbox,
    host_counts,
    in_error,
    phase_counts,
    rows_after,
    stub_row,
)
from sandboxctl.statemachine.names import validate_name
from sandboxctl.statemachine.phases import Phase
from sandboxctl.statemachine.queries import list_problem

log = logging.getLogger(__name__)

# A reader of the log retries while JetStream is away; a history request gives up after this.
HISTORY_DEADLINE = 8.0  # under the client's own request timeout (10 s), so the reason reaches it

# Bytes kept free in every reply beside its items: the reply's own fields and a cursor of the
# longest name fit in far less.
REPLY_MARGIN = 1024
# ``summary``: how many sandboxes in Error it names, and how much of each one's reason.
SUMMARY_ERRORS = 50

QUERIES = ("get", "list", "history", "summary", "hosts")
# How long a query waits for its projection to reach the log position its client has seen
# before answering ``unavailable``: a projector a little behind catches up in far less.
READ_PATIENCE = 1.0
READ_PAUSE = (0.0005, 0.01)  # seconds between its looks at the projection's position: first, at most


class Behind(Exception):
    """This replica's projection is at ``position``, behind the ``wanted`` its client has seen."""

    def __init__(self, position: int, wanted: int) -> None:
        super().__init__(position, wanted)
        self.position, self.wanted = position, wanted


def list_request(payload: bytes) -> ListRequest | str:
    """A list request from its JSON, or why it is invalid."""
    try:
        request = msgspec.json.decode(payload or b"{}", type=ListRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return f"malformed query: {exc}"
    return list_problem(request) or request


class _Page:
    """Encoded items for one reply, never more than ``budget`` bytes together."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.items: list[msgspec.Raw] = []
        self.size = 0

    def fits(self, item: bytes) -> bool:
        return self.size + len(item) + 1 <= self.budget  # one comma between items

    def add(self, item: bytes) -> None:
        self.items.append(msgspec.Raw(item))
        self.size += len(item) + 1

    def __len__(self) -> int:
        return len(self.items)


class QueryService:
    """Answers get, list, history and summary on ``sandboxctl.query.<kind>``.

    Consumes: requests (request/reply), the projection (read only) and, for history, the log.
    Produces: one ``Reply`` per request, into the asker's inbox only. Promises: every request
    is answered, with a result or a structured error, and every answer fits one NATS message
    (list and history page). It only reads, so any number of replicas may run."""

    def __init__(self, nc: NATS, db_path: Path) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.db_path = db_path
        self._sub: Any = None
        self._pending: set[asyncio.Task[None]] = set()
        self.tasks: list[asyncio.Task[None]] = []
        # The hosts as announced: a get of a sandbox on a lost host says it is unreachable.
        self.hosts = HostsView(nc.jetstream())

    async def start(self) -> None:
        self.db = await connect(self.db_path)
        self.tasks.append(asyncio.create_task(self.hosts.run(), name="query-hosts"))
        self._sub = await self.nc.subscribe(subjects.query("*"), queue="sandboxctl-query", cb=self._on_request)
        await settle(self.nc)  # started means answering

    async def stop(self) -> None:
        """Stop answering, within bounds, and close the database whatever happens: an open
        aiosqlite connection's thread would keep the process from exiting."""
        try:
            if self._sub is not None:
                unsubscribing = asyncio.ensure_future(self._sub.unsubscribe())
                await asyncio.wait({unsubscribing}, timeout=5)
                if unsubscribing.done() and not unsubscribing.cancelled():
                    unsubscribing.exception()  # a closed connection has nothing to unsubscribe: not an error
            if self._pending:
                await asyncio.wait(self._pending, timeout=5)
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            await self.db.close()

    @property
    def budget(self) -> int:
        """The most a page's items may take: the connection's max payload less the reply's own fields."""
        return int(self.nc.max_payload) - REPLY_MARGIN

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._respond(msg))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _respond(self, msg: Msg) -> None:
        """Answer ``msg`` whatever happens: a failure to decide, to encode or to send the reply is
        answered with an ``internal`` error that fits, so no query is left to time out."""
        kind = msg.subject.rsplit(".", 1)[-1]
        try:
            reply = await self.handle(kind, msg.data)
        except Exception as exc:
            log.exception("query %s failed", msg.subject)
            reply = error_reply(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if not msg.reply:
            return
        if not subjects.replies_to(msg.reply):
            # A request names its reply subject, and a response may go wherever it names (the
            # log included): answer only into an inbox.
            log.warning("query %s: no answer to %s, which is not an inbox", msg.subject[:200], msg.reply[:200])
            return
        try:
            data = encode(reply)
            if len(data) <= self.nc.max_payload:
                await msg.respond(data)
                return
            problem = f"the {kind[:20]} reply is {len(data)} bytes, over the {self.nc.max_payload}-byte max payload"
        except Exception as exc:
            problem = f"the {kind[:20]} reply could not be sent: {type(exc).__name__}: {exc}"
        log.error("query %s: %s", msg.subject, problem)
        try:
            await msg.respond(encode(error_reply(ErrorCode.INTERNAL, problem, reply.sandbox)))
        except Exception:
            log.exception("query %s: cannot send even an error reply", msg.subject)

    async def handle(self, kind: str, payload: bytes) -> Reply:
        try:
            if kind == "get":
                get = msgspec.json.decode(payload, type=GetRequest)
                problem = validate_name(get.name)
                if problem:
                    return error_reply(ErrorCode.INVALID_ARGUMENT, problem)
                position = await self._position(get.at_least)
                item = await get_sandbox(self.db, get.name)
                if item is None:
                    return error_reply(ErrorCode.NOT_FOUND, f"sandbox {get.name} not found", get.name)
                host = item["host"]
                item["unreachable"] = bool(host) and host in self.hosts.hosts and not self.hosts.live(host)
                announced = self.hosts.hosts.get(host)
                if item["driver"] == "vm" and announced is not None and announced.acceleration:
                    item["acceleration"] = announced.acceleration  # how its host runs VMs: kvm or tcg
                return Reply(
                    accepted=True,
                    sandbox=get.name,
                    phase=item["phase"],
                    seq=item["last_seq"],
                    result=item,
                    position=position,
                )
            if kind == "list":
                request = list_request(payload)
                if isinstance(request, str):
                    return error_reply(ErrorCode.INVALID_ARGUMENT, request)
                return await self._list(request, await self._position(request.at_least))
            if kind == "history":
                return await self._history(msgspec.json.decode(payload, type=HistoryRequest))
            if kind == "summary":
                summary = msgspec.json.decode(payload or b"{}", type=SummaryRequest)
                position = await self._position(summary.at_least)
                counts = await phase_counts(self.db)
                errors = await in_error(self.db, SUMMARY_ERRORS, REASON_MAX)
                phases = {p.value: n for p, n in counts.items()}
                result = Summary(phases, [InError(**e) for e in errors])
                return Reply(accepted=True, result=result, position=position)
            if kind == "hosts":
                hosts = msgspec.json.decode(payload or b"{}", type=HostsRequest)
                return await self._hosts(await self._position(hosts.at_least))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return error_reply(ErrorCode.INVALID_ARGUMENT, f"malformed query: {exc}")
        except Behind as exc:
            return error_reply(
                ErrorCode.UNAVAILABLE,
                f"this query replica's projection is at log seq {exc.position}, behind seq {exc.wanted} that "
                "you have seen; ask again (another replica may answer)",
            )
        return error_reply(ErrorCode.INVALID_ARGUMENT, f"unknown query {kind[:40]!r}; use {', '.join(QUERIES)}")

    async def _hosts(self, position: int) -> Reply:
        try:
            await asyncio.wait_for(self.hosts.ready.wait(), READ_PATIENCE)
        except TimeoutError:
            return error_reply(
                ErrorCode.UNAVAILABLE, "this query replica has not read the hosts' bucket yet; ask again"
            )
        counts = await host_counts(self.db)
        rows = []
        for name, host in sorted(self.hosts.hosts.items()):
            placed, running = counts.get(name, (0, 0))
            state = (
                HostState.LOST
                if not self.hosts.live(name)
                else HostState.DRAINING
                if name in self.hosts.draining
                else HostState.READY
            )
            rows.append(
                HostRow(
                    name=name,
                    state=state,
                    engines=list(host.engines),
                    labels=dict(host.labels),
                    cpus=host.cpus,
                    memory=host.memory,
                    max_sandboxes=host.max_sandboxes,
                    placed=placed,
                    running=running,
                    last_heartbeat=round(self.hosts.age(name), 1),
                    heartbeat_window=host.heartbeat,
                    acceleration=host.acceleration,
                )
            )
        unplaced = HostCount(*counts.get("", (0, 0)))
        return Reply(accepted=True, result=HostList(rows, unplaced), position=position)

    async def _position(self, at_least: int) -> int:
        """The projection's position, once it is at least ``at_least``: read before the rows, so
        the rows reflect at least that much of the log. Waits up to READ_PATIENCE for a projector
        a little behind, then raises Behind."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_PATIENCE
        pause = READ_PAUSE[0]  # short at first: the commit a client just heard of is under way
        while (position := await checkpoint(self.db)) < at_least:
            if loop.time() >= deadline:
                raise Behind(position, at_least)
            await asyncio.sleep(pause)
            pause = min(pause * 2, READ_PAUSE[1])
        return position

    async def _list(self, request: ListRequest, position: int) -> Reply:
        page, last, more = _Page(self.budget), "", False
        rows = rows_after(
            self.db,
            request.after,
            request.limit + 1,  # one more than the page: whether there is a next one
            [Phase(p) for p in request.phases],
            request.labels,
            request.include_deleted,
            request.host,
        )
        async with contextlib.aclosing(rows):
            async for row in rows:
                item = encoded_row(row)
                if len(page) == request.limit or (page and not page.fits(item)):
                    more = True
                    break
                if not page.fits(item):
                    log.error("list: sandbox %s's row is %d bytes, over a page: listed truncated", row[0], len(item))
                    item = stub_row(row)
                page.add(item)
                last = row[0]
        return Reply(accepted=True, result=ListPage(page.items, last if more else ""), position=position)

    async def _history(self, request: HistoryRequest) -> Reply:
        name = request.name
        problem = validate_name(name)
        if problem:
            return error_reply(ErrorCode.INVALID_ARGUMENT, problem)
        try:
            # One more than a page: whether there is a next page is known without reading the rest.
            events = await asyncio.wait_for(history(self.js, name, request.after, request.limit + 1), HISTORY_DEADLINE)
        except TimeoutError:
            return error_reply(
                ErrorCode.INTERNAL, f"history of {name}: the log did not answer in {HISTORY_DEADLINE:g}s", name
            )
        # Nothing after the cursor is an empty last page; nothing at all is no such sandbox.
        if not events and (not request.after or not await last_subject_seq(self.js, name)):
            return error_reply(ErrorCode.NOT_FOUND, f"sandbox {name} has no history", name)
        page, last, more = _Page(self.budget), 0, False
        for record, item in _encoded_after(events, request.after):
            if len(page) == request.limit or not page.fits(item):
                if page:
                    more = True
                    break
                # One event larger than a page: only a log written outside events/limits.py holds one.
                item = encode({**{k: record.get(k) for k in ("seq", "sandbox", "type", "phase")}, "truncated": True})
            page.add(item)
            last = record["seq"]
        return Reply(accepted=True, sandbox=name, result=HistoryPage(page.items, last if more else 0))


def _encoded_after(events: list[dict[str, Any]], after: int) -> Iterator[tuple[dict[str, Any], bytes]]:
    for record in events:
        if record["seq"] > after:
            yield record, encode(record)
