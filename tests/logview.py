"""Reading sandboxes' phases off the log in tests, independently of the services under test."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sandboxctl.bus.eventlog import DecodeError, decode_event, decode_fact
from sandboxctl.bus.tail import Tail
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope
from sandboxctl.statemachine import IllegalTransition, SandboxState, evolve

# The lifecycle, written out from docs/architecture.md rather than taken from the decider;
# any other kind of event (a touch, a lease, a warning) keeps the phase.
PHASE_AFTER = {
    "created": "Provisioning",
    "ready": "Ready",
    "stop_requested": "Stopping",
    "stopped": "Stopped",
    "start_requested": "Starting",
    "failed": "Error",
    "delete_requested": "Deleting",
    "deleted": "Deleted",
}


def event_kind(type_: str) -> str:
    """``sandboxctl.sandbox.stopped.v1`` -> ``stopped``: the kind, whatever its version."""
    return type_.split(".")[2]


def kinds(history: list[dict[str, Any]]) -> list[str]:
    """The kind of each entry of a sandbox's history, in order."""
    return [event_kind(h["type"]) for h in history]


async def settled(client: SandboxClient, name: str) -> dict[str, Any]:
    """The sandbox's row once the projection has caught up with its log."""
    last = [seq async for seq, _ in client.events(name, follow=False)][-1]
    for _ in range(200):
        item = await client.get(name)
        if item["last_seq"] >= last:
            return item
        await asyncio.sleep(0.05)
    raise AssertionError(f"the projection of {name} did not reach seq {last}")


def phase_after(type_: str, before: str | None) -> str | None:
    return PHASE_AFTER.get(event_kind(type_), before)


async def facts_of(js: Any, name: str) -> list[tuple[int, Envelope]]:
    """Every driver fact stored so far about one sandbox, in stream order, whichever host reported it."""
    tail = Tail(js, subjects.FACTS_STREAM, subjects.FACTS_ALL, 1, batch=500)
    end = await tail.last_seq()
    found: list[tuple[int, Envelope]] = []
    try:
        async for batch in tail.batches():
            found += [
                (msg.metadata.sequence.stream, decode_fact(msg.data))
                for msg in batch
                if subjects.name_of(msg.subject) == name
            ]
            if tail.next_seq > end:
                break
    finally:
        await tail.close()
    return found


class LogFollower:
    """Every sandbox's state folded from the whole log as it grows; rides out server restarts."""

    def __init__(self, js: Any) -> None:
        self.tail = Tail(js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=1)
        self.states: dict[str, SandboxState] = {}
        self.position = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LogFollower:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for batch in self.tail.batches():
            for msg in batch:
                seq = msg.metadata.sequence.stream
                try:
                    envelope = decode_event(msg.data)
                    self.states[envelope.subject] = evolve(self.states.get(envelope.subject), envelope, seq)
                except (*DecodeError, IllegalTransition) as exc:
                    raise AssertionError(f"log seq {seq} cannot be folded: {exc}") from exc
                self.position = seq

    def phase(self, name: str) -> tuple[int, str | None]:
        state = self.states.get(name)
        return (state.seq, state.phase.value) if state else (0, None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.tail.close()
