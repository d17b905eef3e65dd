"""Queries and their results: what the query service answers on ``sandboxctl.query.<kind>``.

Requests are JSON objects; every answer is a ``Reply`` whose ``result`` is one of the
result types below. ``list`` and ``history`` answer in pages, so that no reply can exceed
the max payload however many sandboxes or events there are: a page holds at most
``limit`` items and is cut before its encoding passes the max payload; ``next`` is the
cursor of the following page (``after`` in the next request), empty (or 0) at the end.

Reads never go backwards for a client: ``get``, ``list`` and ``summary`` take ``at_least``, the
highest log sequence the client has seen (its commands' replies' ``seq``, its queries' replies'
``position``). A query replica whose projection has not folded that far waits a moment for it,
and otherwise answers ``unavailable`` (the client asks again, and another replica may answer).
Every answer from a projection carries its ``position``: the log sequence it reflects at least.
``history`` reads the log itself, which is never behind.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from sandboxctl.events.commands import HostName, Labels
from sandboxctl.events.limits import NAME_MAX, PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, SEQ_MAX

Limit = Annotated[int, msgspec.Meta(ge=1, le=PAGE_LIMIT_MAX)]
PhaseName = Annotated[str, msgspec.Meta(max_length=16)]  # a phase's name; the service checks it is one
PHASES_MAX = 16  # phase names in one list request (there are 12 phases)
# The highest log sequence the client has seen: the answer reflects at least that much of the log.
AtLeast = Annotated[int, msgspec.Meta(ge=0, le=SEQ_MAX)]


class GetRequest(msgspec.Struct):
    """One sandbox's row; ``result`` is the row."""

    name: str
    at_least: AtLeast = 0


class ListRequest(msgspec.Struct):
    """Sandboxes in name order. ``phases``: rows in any of these phases; none: every phase but
    Deleted, unless ``include_deleted``. ``labels``: rows carrying every one of these.
    ``after``: the ``next`` of the previous page."""

    phases: Annotated[list[PhaseName], msgspec.Meta(max_length=PHASES_MAX)] = []
    labels: Labels = {}
    include_deleted: bool = False
    host: HostName = ""  # rows placed on this host
    after: Annotated[str, msgspec.Meta(max_length=NAME_MAX)] = ""
    at_least: AtLeast = 0
    limit: Limit = PAGE_LIMIT_DEFAULT


class HistoryRequest(msgspec.Struct):
    """A sandbox's events after log sequence ``after`` (the ``next`` of the previous page), in
    order, each with the phase after it, read from the log."""

    name: str
    after: Annotated[int, msgspec.Meta(ge=0, le=SEQ_MAX)] = 0
    limit: Limit = PAGE_LIMIT_DEFAULT


class SummaryRequest(msgspec.Struct):
    """What ``sandboxctl top`` shows, bounded whatever the number of sandboxes."""

    at_least: AtLeast = 0


class ListPage(msgspec.Struct):
    """``items``: rows as ``get`` returns them (a row too large for a page, which only a log written
    outside the bounds holds, as its identity and phase with ``truncated``)."""

    items: list[msgspec.Raw]
    next: str = ""


class HistoryPage(msgspec.Struct):
    items: list[msgspec.Raw]
    next: int = 0


class InError(msgspec.Struct):
    name: str
    last_error: str
    updated_at: str


class Summary(msgspec.Struct):
    """Sandboxes per phase, and the most recent ones in Error (at most 50, reasons cut)."""

    phases: dict[str, int]
    errors: list[InError]


class HostsRequest(msgspec.Struct):
    """Every host announced, with its sandboxes as far as the projection has read the log."""

    at_least: AtLeast = 0


class HostState(enum.StrEnum):
    READY = "ready"
    DRAINING = "draining"  # an operator drained it: nothing new is placed there
    LOST = "lost"  # not heard from for its heartbeat window


class HostCount(msgspec.Struct):
    placed: int  # not Deleted
    running: int  # Ready


class HostRow(msgspec.Struct, kw_only=True):
    """A host as its workers announced it (engines, capacity, labels), its state and sandboxes.
    ``last_heartbeat``: seconds since the answering service last heard from it, counted on that
    service's own clock (never a comparison of two machines' clocks)."""

    name: str
    state: HostState
    engines: list[str]
    labels: dict[str, str]
    cpus: float
    memory: int  # bytes
    max_sandboxes: int
    placed: int
    running: int
    last_heartbeat: float
    heartbeat_window: float
    acceleration: str = ""  # of its VM sandboxes: "kvm" or "tcg" ("" without the vm engine)


class HostList(msgspec.Struct):
    """``hosts`` in name order; ``unplaced``: the sandboxes placed on no host (made before hosts)."""

    hosts: list[HostRow]
    unplaced: HostCount


QUERY_TYPES = {
    "get": GetRequest,
    "list": ListRequest,
    "history": HistoryRequest,
    "summary": SummaryRequest,
    "hosts": HostsRequest,
}
