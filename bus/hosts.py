"""Hosts in the hosts' key-value bucket: a process that runs driver workers announces its host and
keeps the announcement fresh (``Announcer``); the state machine and the query service follow them
(``HostsView``), and the query service answers ``sandboxctl hosts`` from its own view.

An announcement is rewritten every third of its heartbeat window. A host whose announcement has
not been rewritten for the window is lost; its entry stays, so that ``sandboxctl hosts`` shows it
as lost and its return is the same host. A host name is held by one installation at a time (the
announcement's ``worker``): a second one that announces a name whose holder is alive is refused,
so two machines never take each other's work orders. Liveness is always watched on the watcher's
own clock (a new revision is a heartbeat), never read from the server's time stamps: two machines'
clocks need not agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from sandboxctl.bus.natsinternals import connection_of, on_reconnected
from sandboxctl.bus.streams import key_value_bucket
from sandboxctl.bus.tail import Tail, reraise_if_cancelling, stream_seq
from sandboxctl.events import subjects
from sandboxctl.events.hosts import (
    DRAIN_PREFIX,
    UNPLACED_PREFIX,
    HostAnnouncement,
    decode_host,
    encode_host,
)
from sandboxctl.events.limits import HOST_MAX

log = logging.getLogger(__name__)

# A host's durable consumer says in its metadata whether it works the sandboxes placed on no host.
ADOPTS = "sandboxctl-adopts-unplaced"


def drain_key(host: str) -> str:
    return DRAIN_PREFIX + host


async def claim_unplaced(js: JetStreamContext, engine: str, host: str) -> bool:
    """Whether ``host`` works the sandboxes of ``engine`` placed on no host: the first host to
    ask, ever, does (it takes over the consumer of no host), and no other."""
    kv = await hosts_bucket(js)
    key = UNPLACED_PREFIX + engine
    try:
        await kv.create(key, host.encode())
        return True
    except KeyWrongLastSequenceError:
        stored = await _stored(js, key)
        return stored is not None and stored[0] == host.encode()


class HostTaken(Exception):
    """The host name is held by another installation whose heartbeat is alive."""


async def hosts_bucket(js: JetStreamContext, replicas: int | None = None) -> KeyValue:
    """The hosts' bucket, made if missing (replicas as the streams). No TTL: a lost host stays
    listed, as lost, until it comes back."""
    return await key_value_bucket(
        js, subjects.HOSTS_BUCKET, "sandboxctl: each host's announcement, renewed by its heartbeat", replicas
    )


async def _stored(js: JetStreamContext, name: str) -> tuple[bytes, int] | None:
    """The entry ``name`` as stored: its value and its revision (None: never written, or deleted)."""
    try:
        msg = await js.get_msg(subjects.HOSTS_STREAM, subject=key_subject(name))
    except NotFoundError:
        return None
    if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
        return None
    return msg.data or b"", int(msg.seq or 0)


_KEYS = f"$KV.{subjects.HOSTS_BUCKET}."  # + a key: the subject of its entry


def key_subject(key: str) -> str:
    return _KEYS + key


def _holder(value: bytes) -> HostAnnouncement | None:
    """The announcement an entry holds; None if it does not decode."""
    try:
        return decode_host(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _stamp(msg: RawStreamMsg) -> float:
    """When the server stored ``msg`` (seconds since the epoch, by the server's clock)."""
    written: object = msg.time
    if isinstance(written, datetime):
        return written.timestamp()
    if isinstance(written, (int, float)):
        return written / 1e9 if written > 1e12 else float(written)
    return 0.0


async def _older_than_newest(js: JetStreamContext, key: str) -> float:
    """How much older entry ``key`` is than the bucket's newest: a lower bound of its age read
    from the server's stamps alone (0 when it cannot be told)."""
    try:
        entry = await js.get_msg(subjects.HOSTS_STREAM, subject=key_subject(key))
        last = (await js.stream_info(subjects.HOSTS_STREAM)).state.last_seq
        newest = await js.get_msg(subjects.HOSTS_STREAM, seq=last)
    except NotFoundError:
        return 0.0
    return max(_stamp(newest) - _stamp(entry), 0.0)


async def _keys(js: JetStreamContext) -> list[str]:
    """The keys the hosts' bucket holds, from its stream's subjects (no consumer needed)."""
    try:
        info = await js.stream_info(subjects.HOSTS_STREAM, subjects_filter=f"{_KEYS}>")
    except NotFoundError:
        return []
    return sorted(subject.removeprefix(_KEYS) for subject in (info.state.subjects or {}))


async def announced(js: JetStreamContext, host: str) -> bool:
    """Whether ``host`` has an announcement in the bucket (live or lost)."""
    return await _stored(js, host) is not None


async def drain(js: JetStreamContext, host: str, draining: bool = True) -> None:
    """Stop placing sandboxes on ``host`` (or, with ``draining`` False, place them there again)."""
    kv = await hosts_bucket(js)
    if draining:
        await kv.put(drain_key(host), b"draining")
    else:
        with contextlib.suppress(KeyNotFoundError):
            await kv.delete(drain_key(host))


class Announcer:
    """Announce ``host`` and renew it every third of its heartbeat window until stopped."""

    def __init__(self, js: JetStreamContext, host: HostAnnouncement, replicas: int | None = None) -> None:
        self.js, self.host, self.replicas = js, host, replicas
        self._kv: KeyValue | None = None
        self._revision = 0
        self.task: asyncio.Task[None] | None = None

    async def claim(self) -> None:
        """Announce the host, or raise HostTaken if another installation holds its name and is
        alive. Whether it is alive is watched on this machine's clock, never read by comparing the
        entry's time stamp with this machine's clock (two machines' clocks need not agree): its
        holder renews it every third of its window, so a name not renewed for a whole window is
        taken over, and one renewed is not. An entry the server's own stamps already show older
        than its window (against the bucket's newest entry) is taken over at once."""
        kv = self._kv = await hosts_bucket(self.js, self.replicas)
        data = encode_host(self.host)
        while True:
            try:
                self._revision = await kv.create(self.host.name, data)
                return
            except KeyWrongLastSequenceError:
                pass
            stored = await _stored(self.js, self.host.name)
            if stored is None:  # deleted since: make it again
                self._revision = await kv.put(self.host.name, data)
                return
            value, revision = stored
            held = _holder(value)
            if held is not None and held.worker != self.host.worker:
                if await _older_than_newest(self.js, self.host.name) <= held.heartbeat:
                    await self._wait_out(held, revision)
            try:
                self._revision = await kv.update(self.host.name, data, last=revision)
                return
            except KeyWrongLastSequenceError:
                continue  # written meanwhile (another installation taking it too): look again

    async def _wait_out(self, held: HostAnnouncement, revision: int) -> None:
        """Watch ``held``'s entry for its whole window: HostTaken, naming whoever holds it, as soon
        as it is renewed. The bus's trouble meanwhile is waited out, not taken for silence: the
        entry is read again until the window has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + held.heartbeat
        log.warning(
            "hosts: host %s is held by worker %s; taking it over unless it is renewed within %.0f s",
            self.host.name,
            held.worker[:80],
            held.heartbeat,
        )
        while loop.time() < deadline:
            await asyncio.sleep(min(1.0, held.heartbeat / 6))
            try:
                now = await _stored(self.js, self.host.name)
            except Exception as exc:
                reraise_if_cancelling()
                log.warning("hosts: could not read %s (%r); watching on", self.host.name, exc)
                continue
            if now is not None and now[1] != revision:
                holder = _holder(now[0])
                who = holder.worker if holder is not None else "(unreadable)"
                raise HostTaken(
                    f"host {self.host.name} is held by worker {who}, which renewed it just now: "
                    "give this machine another name (SANDBOXCTL_HOST)"
                )

    def start(self) -> None:
        self.task = asyncio.create_task(self._renew(), name=f"host-{self.host.name}-heartbeat")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _renew(self) -> None:
        assert self._kv is not None
        data = encode_host(self.host)
        while True:
            await asyncio.sleep(self.host.heartbeat / 3)
            try:
                self._revision = await self._kv.update(self.host.name, data, last=self._revision)
            except KeyWrongLastSequenceError:
                # Rewritten by someone else: taken over after our heartbeat lapsed, or our last
                # write was stored though its answer was lost. Claim it again, or say who has it.
                try:
                    await self.claim()
                except HostTaken:
                    raise  # ends the service: its supervisor says so, and tries again
                except Exception as exc:
                    reraise_if_cancelling()
                    log.warning("hosts: could not renew %s: %r", self.host.name, exc)
            except Exception as exc:
                reraise_if_cancelling()
                log.warning("hosts: could not renew %s: %r", self.host.name, exc)


class HostsView:
    """The hosts as announced, followed as they change (the state machine places by it).

    Liveness is counted on this process's own clock, never against another machine's: a host is
    heard from when a new revision of its announcement arrives (a heartbeat). What this view finds
    at its start is as old as the server's own stamps say against the bucket's newest entry (a
    lower bound: two stamps of one clock); when its connection comes back every host gets a full
    window of grace (a view that was away itself has missed the heartbeats, not the host). A host
    not heard from for half its window is read again directly, so a reader that went quiet never
    makes a live host look lost."""

    def __init__(
        self,
        js: JetStreamContext,
        make: bool = False,
        on_change: Callable[[str], None] | None = None,
        replicas: int | None = None,
    ) -> None:
        self.js = js
        self.make = make  # make the bucket if missing (a reader that may not waits for it)
        self.replicas = replicas  # of the bucket, when this view makes it
        self.on_change = on_change  # told each host whose announcement or drain changed
        self.hosts: dict[str, HostAnnouncement] = {}
        self.draining: set[str] = set()
        self.adopters: dict[str, str] = {}  # per engine, the host that works the sandboxes placed on no host
        self._heard: dict[str, float] = {}  # when each was last heard from (time.monotonic())
        self._revision: dict[str, int] = {}  # the revision of each announcement last read
        self.ready = asyncio.Event()  # set once the bucket's entries at start have been read
        on_reconnected(connection_of(js), self._reconnected)

    async def _reconnected(self) -> None:
        now = time.monotonic()
        for name in self._heard:
            self._heard[name] = now

    def age(self, name: str) -> float:
        """Seconds since host ``name`` was last heard from."""
        return time.monotonic() - self._heard.get(name, -1e9)

    def live(self, name: str) -> bool:
        host = self.hosts.get(name)
        return host is not None and self.age(name) <= host.heartbeat

    def _take(self, key: str, value: bytes | None, revision: int, behind: float = 0.0) -> None:
        """The entry ``key`` at ``revision`` (its stream sequence) holds ``value`` (None: deleted),
        written at least ``behind`` seconds ago."""
        if key.startswith(UNPLACED_PREFIX):
            engine = key.removeprefix(UNPLACED_PREFIX)
            if value:
                self.adopters[engine] = value.decode(errors="replace")[:HOST_MAX]
            else:
                self.adopters.pop(engine, None)
            return
        was_live = self.live(key)
        self._read(key, value, revision, behind)
        if self.on_change is not None and (key.startswith(DRAIN_PREFIX) or revision or was_live != self.live(key)):
            self.on_change(key.removeprefix(DRAIN_PREFIX))

    def _read(self, key: str, value: bytes | None, revision: int, behind: float) -> None:
        if key.startswith(DRAIN_PREFIX):
            drained_host = key.removeprefix(DRAIN_PREFIX)
            if value:
                self.draining.add(drained_host)
            else:
                self.draining.discard(drained_host)
            return
        if not value:
            self.hosts.pop(key, None)
            self._heard.pop(key, None)
            self._revision.pop(key, None)
            return
        if revision and revision <= self._revision.get(key, 0):
            return  # read already: no news of the host
        try:
            host = decode_host(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("hosts: the announcement of %s is unreadable, skipped: %s", key[:80], exc)
            return
        if host.name != key:
            log.error("hosts: the entry %s announces host %s; skipped", key[:80], host.name[:80])
            return
        self.hosts[key] = host
        self._heard[key] = time.monotonic() - max(behind, 0.0)
        self._revision[key] = revision

    async def run(self) -> None:
        while True:
            tail = None
            try:
                if self.make:
                    await hosts_bucket(self.js, self.replicas)
                else:
                    try:
                        await self.js.stream_info(subjects.HOSTS_STREAM)
                    except NotFoundError:
                        self.ready.set()  # no host announced yet
                        await asyncio.sleep(1.0)
                        continue
                tail = Tail(self.js, subjects.HOSTS_STREAM, f"{_KEYS}>")
                known = await tail.last_seq()  # what was there at start: read, and the view is ready
                refreshed = time.monotonic()
                # The entries there at start, taken together once read: each is as old as the
                # server's stamps say against the newest (both the server's: no clock compared).
                first: list[tuple[str, bytes | None, int, float]] | None = []
                async for msgs in tail.batches():
                    for msg in msgs:
                        operation = (msg.headers or {}).get("KV-Operation")
                        value = None if operation in ("DEL", "PURGE") else msg.data
                        key, seq = msg.subject.removeprefix(_KEYS), stream_seq(msg)
                        if first is not None and seq <= known:
                            first.append((key, value, seq, msg.metadata.timestamp.timestamp()))
                        else:
                            self._take(key, value, seq)
                    if tail.next_seq > known and first is not None:
                        newest = max((stamp for *_, stamp in first), default=0.0)
                        for key, value, seq, stamp in first:
                            self._take(key, value, seq, behind=newest - stamp)
                        first = None
                        self.ready.set()
                    if time.monotonic() - refreshed > 5.0:
                        await self._refresh()
                        refreshed = time.monotonic()
            except Exception as exc:
                reraise_if_cancelling()
                log.warning("hosts: following the hosts' bucket failed (%r); again in 1 s", exc)
                await asyncio.sleep(1.0)
            finally:
                if tail is not None:
                    with contextlib.suppress(Exception):
                        await tail.close()

    async def reload(self) -> bool:
        """Read every host afresh (a create that found no host may have come before the watch
        brought one); whether anything was new."""
        before = dict(self.hosts), set(self.draining), {name for name in self.hosts if self.live(name)}
        keys = await _keys(self.js)
        for key in keys:
            stored = await _stored(self.js, key)
            self._take(key, None if stored is None else stored[0], 0 if stored is None else stored[1])
        for host in self.draining - {k.removeprefix(DRAIN_PREFIX) for k in keys if k.startswith(DRAIN_PREFIX)}:
            self._take(drain_key(host), None, 0)  # purged
        return (self.hosts, self.draining, {name for name in self.hosts if self.live(name)}) != before

    async def _refresh(self) -> None:
        for name, host in list(self.hosts.items()):
            if self.age(name) > host.heartbeat / 2:
                stored = await _stored(self.js, name)
                self._take(name, None if stored is None else stored[0], 0 if stored is None else stored[1])
