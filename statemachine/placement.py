"""Where a new sandbox runs: the host with the most room among those that can take it.

Pure: the hosts as announced (events/hosts.py), what each already holds, and the create's
wishes in; a host's name or a refusal out. The state machine's shell calls it once per create
and records the host in the ``created`` event, so that a replay of the log places nothing anew.

The rule, predictable and explainable as a small scheduler's should be:

1. A host is a candidate if it is live (its heartbeat has not lapsed), not draining, has the
   sandbox's engine, is the host asked for (``--host``), carries every label the create requires
   (``--constraint key=value``), and has room: fewer sandboxes than its maximum, and CPUs and
   memory for the limits the sandbox asks (a sandbox without a limit counts for none).
2. Of the candidates, the one whose largest share of capacity is the least used wins (sandboxes,
   CPUs, memory: the scarcest counts), so hosts fill in proportion to their capacity; ties go to
   the most free slots, then to the name.
3. No candidate: ``failed_precondition``, saying for each host why it did not fit.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping

import msgspec

from sandboxctl.events.lifecycle import LifecycleEvent, SandboxFailed
from sandboxctl.events.replies import ErrorCode
from sandboxctl.events.spec import Resources
from sandboxctl.statemachine.phases import Phase
from sandboxctl.statemachine.rejection import Rejection
from sandboxctl.statemachine.state import SandboxState


class HostLoad(msgspec.Struct, kw_only=True):
    """What the sandboxes placed on one host (every one not Deleted) ask of it."""

    sandboxes: int = 0
    cpus: float = 0.0
    memory: int = 0


class Candidate(msgspec.Struct, kw_only=True, frozen=True):
    """A host as placement sees it: its announcement's capacity and labels, and its standing."""

    name: str
    engines: tuple[str, ...]
    labels: Mapping[str, str]
    max_sandboxes: int
    cpus: float
    memory: int
    live: bool = True
    draining: bool = False


def _counts(state: SandboxState | None) -> bool:
    return state is not None and bool(state.host) and state.phase is not Phase.DELETED


class Loads:
    """Each host's load, kept up to date as states change (``changed``), so a placement costs
    nothing in the number of sandboxes."""

    def __init__(self, on_change: Callable[[str], None] | None = None) -> None:
        self.by_host: dict[str, HostLoad] = {}
        self.names: dict[str, set[str]] = {}  # the sandboxes on each host, not Deleted
        self.reserved: dict[str, HostLoad] = {}  # placed, not yet folded
        self.on_change = on_change  # told the host whose load changed

    def changed(self, before: SandboxState | None, after: SandboxState | None) -> None:
        counted_before, counted_after = _counts(before), _counts(after)
        if not counted_before and not counted_after:
            return
        if (
            counted_before
            and counted_after
            and before is not None
            and after is not None
            and before.host == after.host
            and before.resources == after.resources
        ):
            return  # most events: the same sandbox on the same host, asking the same
        if counted_before:
            assert before is not None
            self._add(before, -1)
            on = self.names.get(before.host)
            if on is not None:
                on.discard(before.name)
                if not on:
                    del self.names[before.host]
        if counted_after:
            assert after is not None
            self._add(after, 1)
            self.names.setdefault(after.host, set()).add(after.name)

    def _add(self, state: SandboxState, sign: int) -> None:
        load = self.by_host.setdefault(state.host, HostLoad())
        load.sandboxes += sign
        load.cpus += sign * (state.resources.cpus or 0.0)
        load.memory += sign * (state.resources.memory or 0)
        if load.sandboxes <= 0:
            del self.by_host[state.host]
        if self.on_change is not None:
            self.on_change(state.host)

    def of(self, host: str) -> HostLoad:
        """What ``host`` holds: its sandboxes, and those placed there whose created event is not
        folded yet (reserved), so creates decided at the same moment do not all take one place."""
        load = self.by_host.get(host) or HostLoad()
        held = self.reserved.get(host)
        if held is None:
            return load
        return HostLoad(
            sandboxes=load.sandboxes + held.sandboxes, cpus=load.cpus + held.cpus, memory=load.memory + held.memory
        )

    def reserve(self, host: str, resources: Resources, sign: int = 1) -> None:
        """Count a create placed on ``host`` until its created event is folded (then ``release``)."""
        held = self.reserved.setdefault(host, HostLoad())
        held.sandboxes += sign
        held.cpus += sign * (resources.cpus or 0.0)
        held.memory += sign * (resources.memory or 0)
        if held.sandboxes <= 0:
            del self.reserved[host]
        if self.on_change is not None:
            self.on_change(host)

    def release(self, host: str, resources: Resources) -> None:
        self.reserve(host, resources, -1)


def _why_not(
    host: Candidate, load: HostLoad, driver: str, constraints: Mapping[str, str], resources: Resources, live: bool
) -> str:
    if not (live and host.live):
        return "lost (no heartbeat)"
    if host.draining:
        return "draining"
    if driver not in host.engines:
        return f"has no {driver} (has {', '.join(host.engines) or 'no engine'})"
    unmet = sorted(f"{k}={v}" for k, v in constraints.items() if host.labels.get(k) != v)
    if unmet:
        return f"labels do not match {', '.join(unmet)}"
    if load.sandboxes >= host.max_sandboxes:
        return f"full ({load.sandboxes} of {host.max_sandboxes} sandboxes)"
    if resources.cpus and load.cpus + resources.cpus > host.cpus:
        return f"{host.cpus - load.cpus:g} of {host.cpus:g} CPUs free, {resources.cpus:g} asked"
    if resources.memory and load.memory + resources.memory > host.memory:
        return f"{max(host.memory - load.memory, 0)} of {host.memory} bytes of memory free, {resources.memory} asked"
    return ""


NO_LIMITS = Resources()


def _used(host: Candidate, load: HostLoad, resources: Resources) -> float:
    """The largest share of the host's capacity in use once this sandbox is on it."""
    shares = [(load.sandboxes + 1) / host.max_sandboxes]
    if resources.cpus and host.cpus:
        shares.append((load.cpus + resources.cpus) / host.cpus)
    if resources.memory and host.memory:
        shares.append((load.memory + resources.memory) / host.memory)
    return max(shares)


def place(
    hosts: Iterable[Candidate],
    loads: Loads,
    driver: str,
    resources: Resources,
    host: str = "",
    constraints: Mapping[str, str] | None = None,
    live: Callable[[str], bool] | None = None,
) -> str | Rejection:
    """The host a new sandbox on ``driver`` goes to, or why none fits (module docstring).
    ``live``, when given, says whether a host's heartbeat is current (else its ``live`` does)."""
    constraints = constraints or {}
    best: tuple[float, int, str] | None = None
    refused: list[str] = []
    named = False
    for candidate in hosts:
        if host and candidate.name != host:
            continue
        named = True
        load = loads.of(candidate.name)
        why = _why_not(candidate, load, driver, constraints, resources, live is None or live(candidate.name))
        if why:
            refused.append(f"{candidate.name}: {why}")
            continue
        rank = (_used(candidate, load, resources), -(candidate.max_sandboxes - load.sandboxes), candidate.name)
        if best is None or rank < best:
            best = rank
    if best is not None:
        return best[2]
    if host and not named:
        return Rejection(ErrorCode.FAILED_PRECONDITION, f"no host {host} is announced")
    if not refused:
        return Rejection(ErrorCode.FAILED_PRECONDITION, f"no host is announced to run {driver} sandboxes")
    wanted = f"a {driver} sandbox" + (f" on {host}" if host else "")
    if constraints:
        wanted += " with " + ", ".join(f"{k}={v}" for k, v in sorted(constraints.items()))
    shown = refused[:10] + ([f"and {len(refused) - 10} more"] if len(refused) > 10 else [])
    return Rejection(ErrorCode.FAILED_PRECONDITION, f"no host fits {wanted}: {'; '.join(shown)}")


class Placer:
    """The hosts as placement sees them, indexed: a create that names no host, no constraint and
    no resource limit (the common one) finds the host with the most room in O(log hosts), so
    placing costs the same with ten hosts or thousands; any other create is placed by the scan
    (``place``). Both choose the same host: the index holds each host's rank as ``place`` ranks
    it, pushed again whenever the host, its standing or its load changes (stale entries are
    skipped on the way, and the index is rebuilt once they outnumber the live ones)."""

    def __init__(self, live: Callable[[str], bool]) -> None:
        self.live = live  # whether a host's heartbeat is current, asked at placement time
        self.hosts: dict[str, Candidate] = {}
        self.loads = Loads(on_change=self._index)
        self._version: dict[str, int] = {}
        self._heaps: dict[str, list[tuple[float, int, str, int]]] = {}  # per engine
        self._entries = 0  # in the heaps, stale ones included
        self._indexed = 0  # after the last rebuild
        self._rebuilding = False

    def announce(self, name: str, candidate: Candidate | None) -> None:
        """Host ``name`` as announced now (None: gone)."""
        if candidate is None:
            self.hosts.pop(name, None)
        else:
            self.hosts[name] = candidate
        self._index(name)

    def why_not(self, host: str, driver: str, resources: Resources) -> str:
        """Why a sandbox on ``driver`` asking ``resources`` cannot go to ``host`` now ("" if it can)."""
        candidate = self.hosts.get(host)
        if candidate is None:
            return "not announced"
        return _why_not(candidate, self.loads.of(host), driver, {}, resources, self.live(host))

    def scan(
        self, driver: str, resources: Resources, host: str = "", constraints: Mapping[str, str] | None = None
    ) -> str | Rejection:
        """``place`` over every host, each live as its heartbeat says now."""
        return place(self.hosts.values(), self.loads, driver, resources, host, constraints, self.live)

    def _index(self, name: str) -> None:
        version = self._version[name] = self._version.get(name, 0) + 1
        candidate = self.hosts.get(name)
        if candidate is None:
            return
        load = self.loads.of(name)
        rank = (_used(candidate, load, NO_LIMITS), -(candidate.max_sandboxes - load.sandboxes), name, version)
        for engine in candidate.engines:
            heapq.heappush(self._heaps.setdefault(engine, []), rank)
            self._entries += 1
        if self._entries > 4 * max(self._indexed, 256) and not self._rebuilding:
            self._rebuild()

    def _rebuild(self) -> None:
        self._heaps, self._entries, self._rebuilding = {}, 0, True
        try:
            for name in list(self.hosts):
                self._index(name)
        finally:
            self._rebuilding = False
        self._indexed = self._entries  # what a rebuild leaves: one entry per host and engine

    def place(
        self, driver: str, resources: Resources, host: str = "", constraints: Mapping[str, str] | None = None
    ) -> str | Rejection:
        """As ``place`` over every host, in O(log hosts) for a create with no host, constraint or limit."""
        if host or constraints or resources.cpus or resources.memory:
            return self.scan(driver, resources, host, constraints)
        heap = self._heaps.get(driver, [])
        while heap:
            *_, name, version = heap[0]
            candidate = self.hosts.get(name)
            if candidate is None or version != self._version.get(name):
                heapq.heappop(heap)  # stale: the host changed since
                self._entries -= 1
                continue
            if _why_not(candidate, self.loads.of(name), driver, {}, resources, self.live(name)):
                # Lost, drained or full for now: indexed again when that changes (a heartbeat, an
                # undrain, a sandbox gone).
                heapq.heappop(heap)
                self._entries -= 1
                continue
            return name
        return self.scan(driver, resources, host, constraints)  # none fits: say why


# What a lost host takes down: every sandbox that runs there, or is on its way somewhere. Stopped
# ones keep their phase (their workspace waits on the host, unreachable); Error, Completed and
# Archived ones (nothing on the host runs) keep theirs too.
HOST_LOST = "host_lost"
LOST_WITH_HOST = frozenset(
    {
        Phase.READY,
        Phase.PROVISIONING,
        Phase.STARTING,
        Phase.STOPPING,
        Phase.PAUSING,
        Phase.PAUSED,
        Phase.RESUMING,
        Phase.ARCHIVING,
        Phase.DELETING,
    }
)


def host_lost(state: SandboxState | None, host: str, silent_for: float) -> list[LifecycleEvent]:
    """Error with reason ``host_lost`` for a sandbox on ``host``, which has sent no heartbeat for
    ``silent_for`` seconds, if it was running or moving there; nothing otherwise."""
    if state is None or state.host != host or state.phase not in LOST_WITH_HOST:
        return []
    return [
        SandboxFailed(
            kind=HOST_LOST,
            reason=f"{HOST_LOST}: host {host} sent no heartbeat for {silent_for:.0f} s",
        )
    ]


def foreign_report(state: SandboxState | None, reporter: str | None, adopter: str | None) -> str:
    """Why a fact about ``state``'s sandbox, reported by the worker of host ``reporter`` (None: a
    worker of no host), is not to be believed ("" if it is). Only the sandbox's own host speaks
    for it; for one placed on no host (made before hosts), the host that adopted those of its
    engine (``adopter``, None when no host has), or a worker of no host. A host's worker may
    publish on its own host's fact subjects only (docs/security.md), so one host cannot make
    another's sandboxes look started, stopped or gone."""
    if state is None:
        return ""  # no sandbox: react takes nothing from it
    if state.host:
        if reporter == state.host:
            return ""
        who = f"host {reporter}" if reporter is not None else "a worker of no host"
        return f"a fact from {who} about sandbox {state.name}, which is on host {state.host}"
    if reporter is None or adopter is None or reporter == adopter:
        return ""
    return f"a fact from host {reporter} about sandbox {state.name}, placed on no host ({adopter} works those)"
