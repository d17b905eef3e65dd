"""Poison on every command, query and subject, against a real nats-server, the real control
plane and real podman: at least 10,000 generated inputs a run.

Hypothesis generates what a careless or hostile service could publish, with plain nats-py, as
a client in another language would: random bytes, text that is not JSON, JSON of the wrong
shape, unknown ``type`` tags, every field of every command with a value of the wrong type,
out of its range or just over its bound, and exactly at its bound (which must be accepted, or
refused for what it means, never crash anything), missing fields, commands sent to another
verb's subject or to subjects that are not documented, invalid names, queries of every kind
with wrong shapes and bounds, payloads near and over the max payload, a command id used again
with another command, and forged log entries and driver facts written where the server lets
anyone write (this server has no users).

The run must end with no hang (every request answered within its timeout), no crash (every
service task alive), every reply structured (a JSON reply, an error with a code the input
deserves and a message), every accepted command's events in the log where the reply says, and
every sandbox still usable: each one that poison touched stops and starts again, as the
engine confirms. The field specs come from the contract's own types (msgspec's type info), so
a field added to a command is poisoned without a change here.

Hypothesis drives a synchronous property in a worker thread and hands each example to the
test's event loop, where the plane runs, so failures shrink against the live services. The
regression tests at the bottom pin the bugs this suite found.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import msgspec
import nats
import nats.errors
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.strategies import SearchStrategy

from sandboxctl import audit
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.commands import COMMAND_TYPES
from sandboxctl.events.envelope import Envelope, encode, now, type_name
from sandboxctl.events.facts import ContainerExited, ContainerOrphaned, ContainerStarted, DriverFailed
from sandboxctl.events.lifecycle import SandboxStopped, SandboxStopRequested
from sandboxctl.events.limits import COMMAND_ARG_MAX, LABEL_KEY_MAX, LABEL_VALUE_MAX, PAGE_LIMIT_MAX
from sandboxctl.events.queries import PHASES_MAX
from sandboxctl.events.replies import reply_decoder
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from sandboxctl.statemachine import Phase

VERBS = tuple(cls.VERB for cls in COMMAND_TYPES)
BY_VERB = {cls.VERB: cls for cls in COMMAND_TYPES}
QUERIES = ("get", "list", "history", "summary")
INVALID = frozenset({"invalid_argument"})
NOT_FOUND = frozenset({"not_found"})
# What a well-formed command may be refused with for what it means; never internal, never conflict.
DECIDED = frozenset({"invalid_argument", "not_found", "already_exists", "failed_precondition"})
ACCEPTED = frozenset({"accepted"})
ANY_ANSWER = ACCEPTED | DECIDED
REQUEST_TIMEOUT = 10.0
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]
IMAGE = "localhost/sandboxctl-busybox:latest"

VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
NAME_CHARS = string.ascii_letters + string.digits + "-_"

# How many examples each family asks hypothesis for: over 12,000, so that at least 10,000 are tried
# once the families with few distinct inputs run out (SANDBOXCTL_POISON_SCALE multiplies them).
EXAMPLES = {
    "garbage bytes": 900,
    "text that is not JSON": 500,
    "JSON of the wrong shape": 900,
    "unknown type": 500,
    "field of the wrong type": 1700,
    "field out of range": 1200,
    "field just over its bound": 1100,
    "field at its bound": 600,
    "create at its bounds": 30,
    "missing field": 500,
    "misrouted command": 600,
    "undocumented subject": 300,
    "invalid name": 1100,
    "no such sandbox": 400,
    "id used again with another command": 300,
    "bad query": 1200,
    "forged log entry": 200,
    "forged fact": 200,
    "near max payload": 40,
    "above max payload": 10,
}
SCALE = float(os.environ.get("SANDBOXCTL_POISON_SCALE", "1"))


def is_valid_name(name: str) -> bool:
    return VALID_NAME.fullmatch(name) is not None


# -- cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str
    subject: str
    payload: bytes
    codes: frozenset[str]  # the error codes this input deserves; "accepted" if it may be accepted
    # Forged entries are published to a stream, not sent as requests: the answer is the stream's ack.
    publish: bool = False
    # A command sent (and accepted) just before this one: the first use of an id used again.
    before: bytes = b""

    def __repr__(self) -> str:
        shown = self.payload if len(self.payload) <= 300 else self.payload[:200] + b"...%d bytes" % len(self.payload)
        return f"Case({self.family!r}, {self.subject!r}, {shown!r}, {sorted(self.codes)})"


def new_id() -> str:
    return uuid.uuid4().hex


def body(verb: str, **fields: Any) -> dict[str, Any]:
    """A well-formed command of ``verb`` (its required fields filled), then ``fields``."""
    required: dict[str, Any] = {"name": "px-fresh", "command_id": new_id(), "actor": "poison"}
    if verb == "create":
        required |= {"image": IMAGE, "driver": "podman", "command": SLEEPER}
    if verb in ("lease_acquire", "lease_renew"):
        required |= {"holder": "poison", "ttl": 60}
    if verb in ("lease_release", "hold", "unhold"):
        required["holder"] = "poison"
    if verb == "warn":
        required |= {"kind": "stop", "activity_seq": 1, "grace": 1}
    if verb == "clone":
        required["source"] = "px-fresh-source"
    if verb == "copy":
        required |= {"direction": "in", "path": "/workspace/poison", "size": 1}
    return {"type": f"sandboxctl.command.{verb}.v1", **required, **fields}


def dumps(obj: Any, ascii_only: bool = True) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


PAD = "@PAD@"  # stands for the padding in a body that ``filled`` brings to an exact size


def filled(obj: Any, size: int) -> bytes:
    """``obj`` as JSON of exactly ``size`` bytes, its PAD replaced by as many "p" as that takes."""
    raw = dumps(obj)
    return raw.replace(PAD.encode(), b"p" * (size - len(raw) + len(PAD)))


def text(**kwargs: Any) -> SearchStrategy[str]:
    """Text without lone surrogates, so Python's json and msgspec read it alike."""
    return st.text(alphabet=st.characters(exclude_categories=("Cs",)), **kwargs)


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text()
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(max_size=8), inner, max_size=4)
)

BAD_NAMES = [
    "", " ", "\t", "\n", "\r\n", "\x00", ".", "..", "../x", "../../etc/passwd", "/x", "x/", "a/b", "a\\b",
    "%2e%2e%2fx", "a.b", "a.*", "a.>", "*", ">", "a*", "$SYS", "-x", "_x", " x", "x ", "a b", "x\r", "x\t",
    "x\x00", "x\u200b", "x\u00a0", "\u3000", "é", "naïve", "名前", "😀", "x" * 64, "x" * 1000,
]  # fmt: skip


# -- the contract's own field specs ---------------------------------------------------------


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """The type of a field, and whether it may be null."""
    if isinstance(kind, msgspec.inspect.Metadata):
        kind = kind.type
    if isinstance(kind, msgspec.inspect.UnionType):
        others = [t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType)]
        return _unwrap(others[0])[0], True
    return kind, False


@dataclass(frozen=True)
class Spec:
    verb: str
    name: str
    kind: Any
    required: bool
    nullable: bool


SPECS = [
    Spec(cls.VERB, f.name, *_unwrap(f.type)[:1], f.required, _unwrap(f.type)[1])
    for cls in COMMAND_TYPES
    for f in msgspec.inspect.type_info(cls).fields  # type: ignore[attr-defined]
]
BOUNDED = [s for s in SPECS if s.name != "name"]


def _bound(spec: Spec) -> tuple[str, Any] | None:
    """The field's bound: ("length", n) for strings and collections, ("max", x) / ("min", x) for numbers."""
    kind = spec.kind
    if isinstance(kind, msgspec.inspect.StrType | msgspec.inspect.ListType | msgspec.inspect.DictType):
        return ("length", kind.max_length) if kind.max_length is not None else None
    if isinstance(kind, msgspec.inspect.FloatType | msgspec.inspect.IntType):
        return ("max", kind.le) if kind.le is not None else None
    return None


def at_length(spec: Spec, n: int) -> Any:
    """A value of ``spec``'s kind of length (or size) exactly ``n``, valid in every other way."""
    kind = spec.kind
    if isinstance(kind, msgspec.inspect.StrType):
        if spec.name == "command_id":
            return "c" + new_id()[: max(0, n - 1)].ljust(n - 1, "0")
        return "h" * n
    if isinstance(kind, msgspec.inspect.ListType):
        return ["a"] * n
    if isinstance(kind, msgspec.inspect.DictType):
        return {f"k{i}": "v" for i in range(n)}
    raise AssertionError(spec)


def strategies(
    target: str, spare: str, max_payload: int
) -> tuple[Callable[[str, bytes], frozenset[str]], dict[str, SearchStrategy[Case]]]:
    """Every family of poison. ``target`` is a live sandbox that poison may act on (touch, leases,
    holds, forged entries); ``spare`` another live one that only forged entries name."""

    fresh_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}", fullmatch=True).map(lambda s: f"px-{s}")
    bad_names = st.one_of(
        st.sampled_from(BAD_NAMES),
        text(max_size=80).filter(lambda s: not is_valid_name(s)),
        st.text(alphabet=NAME_CHARS, min_size=64, max_size=300).map(lambda s: "x" + s),
        st.tuples(
            st.text(alphabet=NAME_CHARS, max_size=10),
            st.sampled_from(list("./\\*> \t\r\n\x00$%:;,'\"`~!@#&()[]{}|+=?éß名😀\u200b\u00a0\u3000")),
            st.text(alphabet=NAME_CHARS, max_size=10),
        ).map("".join),
    )
    verbs = st.sampled_from(VERBS)
    non_destructive = st.sampled_from(["touch", "lease_acquire", "lease_renew", "lease_release", "hold", "unhold"])

    def to(verb: str) -> str:
        return subjects.command(verb)

    odd_subjects = st.sampled_from(
        [
            "sandboxctl.cmd.nope",
            "sandboxctl.cmd.a.b",
            "sandboxctl.cmd.x.stop",
            "sandboxctl.cmd.stop.someone",
            "sandboxctl.cmd.stop.a.b",
            "sandboxctl.cmd.Stop",
            "sandboxctl.query.nope",
        ]
    )
    any_subject = st.one_of(verbs.map(to), odd_subjects, st.sampled_from(QUERIES).map(subjects.query))

    @st.composite
    def wrong_type(draw: Callable[..., Any]) -> Case:
        spec = draw(st.sampled_from(SPECS))
        kind = spec.kind
        if isinstance(kind, msgspec.inspect.StrType):
            value = draw(st.integers() | st.floats(allow_nan=False) | st.booleans() | st.lists(text(), max_size=2))
        elif isinstance(kind, msgspec.inspect.FloatType | msgspec.inspect.IntType):
            value = draw(text() | st.lists(st.integers(), max_size=2) | st.dictionaries(text(max_size=3), st.none()))
            if isinstance(kind, msgspec.inspect.IntType):
                value = draw(st.just(value) | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f % 1))
        elif isinstance(kind, msgspec.inspect.ListType):
            value = draw(text() | st.integers() | st.lists(st.integers() | st.none(), min_size=1, max_size=3))
        elif isinstance(kind, msgspec.inspect.DictType):
            value = draw(
                text()
                | st.lists(text(), max_size=2)
                | st.dictionaries(
                    st.sampled_from(["team", "k"]), st.integers() | st.none() | st.lists(text()), min_size=1
                )
            )
        else:
            value = draw(st.integers() | text())
        assume(not (value is None and spec.nullable))  # null is a value these fields may take
        payload = body(spec.verb, name=draw(fresh_names | st.just(target)))
        payload[spec.name] = value
        return Case("field of the wrong type", to(spec.verb), dumps(payload), INVALID)

    numeric = [s for s in BOUNDED if isinstance(s.kind, msgspec.inspect.FloatType | msgspec.inspect.IntType)]

    @st.composite
    def out_of_range(draw: Callable[..., Any]) -> Case:
        spec = draw(st.sampled_from(numeric))
        kind = spec.kind
        low = kind.ge if kind.ge is not None else kind.gt
        choices = [1e309, -1e309, 1e300, -1e300, 2**64, -(2**64)]
        if kind.le is not None:
            choices += [kind.le + 1, kind.le * 2 + 1]
        if low is not None:
            choices += [low - 1, low - 0.001]
        if kind.gt is not None:
            choices.append(kind.gt)
        value = draw(st.sampled_from(choices))
        raw = dumps(body(spec.verb, name=draw(fresh_names), **{spec.name: "@V@"})).replace(
            b'"@V@"', b"1e309" if value == 1e309 else b"-1e309" if value == -1e309 else json.dumps(value).encode()
        )
        return Case("field out of range", to(spec.verb), raw, INVALID)

    sized = [s for s in BOUNDED if _bound(s) is not None and _bound(s)[0] == "length"]  # type: ignore[index]

    @st.composite
    def over_bound(draw: Callable[..., Any]) -> Case:
        spec = draw(st.sampled_from(sized))
        limit = _bound(spec)[1]  # type: ignore[index]
        over = draw(st.integers(1, 64))
        payload = body(
            spec.verb, name=draw(fresh_names | st.just(target)), **{spec.name: at_length(spec, limit + over)}
        )
        if spec.name == "labels" and draw(st.booleans()):  # one label's key or value over its own bound
            payload["labels"] = draw(
                st.sampled_from([{"k" * (LABEL_KEY_MAX + over): "v"}, {"k": "v" * (LABEL_VALUE_MAX + over)}])
            )
        if spec.name == "command" and draw(st.booleans()):  # one argument over its own bound
            payload["command"] = ["sh", "x" * (COMMAND_ARG_MAX + over)]
        return Case("field just over its bound", to(spec.verb), dumps(payload), INVALID)

    @st.composite
    def at_bound(draw: Callable[..., Any]) -> Case:
        """Exactly at a bound: decoded, then decided on what it means. Only the target's
        non-destructive verbs, so poison stops nothing of its own."""
        spec = draw(st.sampled_from([s for s in sized if s.verb in NON_DESTRUCTIVE]))
        payload = body(spec.verb, name=target, **{spec.name: at_length(spec, _bound(spec)[1])})  # type: ignore[index]
        return Case("field at its bound", to(spec.verb), dumps(payload), ANY_ANSWER)

    @st.composite
    def create_at_bound(draw: Callable[..., Any]) -> Case:
        """A create whose fields are all at their bounds at once: accepted, and made by the engine."""
        limits_ = {s.name: _bound(s)[1] for s in sized if s.verb == "create"}  # type: ignore[index]
        labels = {f"k{i:03d}".ljust(LABEL_KEY_MAX, "k"): "v" * LABEL_VALUE_MAX for i in range(limits_["labels"])}
        command = ["sh", "-c", SLEEPER[2], *(["a"] * (limits_["command"] - 3))]
        payload = body(
            "create",
            name="pc-" + draw(fresh_names)[3:],  # names no other family uses: these sandboxes exist
            labels=labels,
            command=command,
            actor="a" * limits_["actor"],
            correlation_id="c" * limits_["correlation_id"],
        )
        return Case("create at its bounds", to("create"), dumps(payload), ANY_ANSWER)

    @st.composite
    def missing(draw: Callable[..., Any]) -> Case:
        verb = draw(verbs)
        payload = body(verb, name=draw(fresh_names | st.just(target)))
        required = ["type", *(f.name for f in msgspec.inspect.type_info(BY_VERB[verb]).fields if f.required)]  # type: ignore[attr-defined]
        for gone in draw(st.lists(st.sampled_from(required), min_size=1, unique=True)):
            del payload[gone]
        return Case("missing field", to(verb), dumps(payload), INVALID)

    @st.composite
    def unknown_type(draw: Callable[..., Any]) -> Case:
        known = {f"sandboxctl.command.{v}.v1" for v in VERBS}
        kind = draw(
            st.sampled_from(
                [
                    "sandboxctl.command.stop.v2",
                    "sandboxctl.command.Stop.v1",
                    "sandboxctl.command.restart.v1",
                    "sandboxctl.command.stop",
                    "sandboxctl.sandbox.created.v1",
                    "sandboxctl.fact.container_started.v1",
                    "SANDBOXCTL.COMMAND.STOP.V1",
                    " sandboxctl.command.stop.v1",
                    "",
                    "stop",
                ]
            )
            | text(max_size=40)
        )
        payload = body("stop", name=draw(fresh_names | st.just(target)))
        payload["type"] = kind if kind not in known else kind + ".x"
        return Case("unknown type", draw(verbs.map(to) | odd_subjects), dumps(payload), INVALID)

    @st.composite
    def misrouted(draw: Callable[..., Any]) -> Case:
        verb = draw(verbs)
        subject = draw(st.sampled_from([v for v in VERBS if v != verb]).map(to))
        return Case("misrouted command", subject, dumps(body(verb, name=draw(fresh_names | st.just(target)))), INVALID)

    @st.composite
    def undocumented(draw: Callable[..., Any]) -> Case:
        verb = draw(non_destructive)
        subject = draw(
            st.sampled_from(
                [f"sandboxctl.cmd.x.{verb}", f"sandboxctl.cmd.{verb}.someone", f"sandboxctl.cmd.{verb}.a.b"]
            )
        )
        return Case("undocumented subject", subject, dumps(body(verb, name=target)), INVALID)

    @st.composite
    def invalid_name(draw: Callable[..., Any]) -> Case:
        verb = draw(verbs)
        return Case("invalid name", to(verb), dumps(body(verb, name=draw(bad_names)), draw(st.booleans())), INVALID)

    @st.composite
    def no_such_sandbox(draw: Callable[..., Any]) -> Case:
        verb = draw(st.sampled_from([v for v in VERBS if v not in ("create", "delete", "warn")]))
        payload = body(verb, name=draw(fresh_names), actor=draw(text(max_size=30)))
        return Case("no such sandbox", to(verb), dumps(payload), NOT_FOUND)

    @st.composite
    def reused(draw: Callable[..., Any]) -> Case:
        """A touch of the target under a fresh id is accepted (sent first, by the probe); then the
        same id comes with another command, which must be refused."""
        first = body("touch", name=target, via="exec")
        verb = draw(st.sampled_from(["touch", "stop", "create", "hold", "lease_acquire"]))
        other = body(verb, name=draw(st.just(target) | fresh_names), command_id=first["command_id"])
        if verb == "touch":
            other["via"] = "shell"
        return Case("id used again with another command", to(verb), dumps(other), INVALID, before=dumps(first))

    def query_expectation(kind: str, payload: bytes) -> frozenset[str]:
        """What a query deserves: an error code, or accepted for a well-formed one."""
        if kind not in QUERIES:
            return INVALID
        try:
            obj = json.loads(payload) if payload else ({} if kind in ("list", "summary") else None)
        except (ValueError, UnicodeDecodeError):
            return INVALID
        if not isinstance(obj, dict):
            return INVALID
        if kind == "summary":
            return ACCEPTED
        if kind in ("list", "history") and not _int_in(obj.get("limit", 1), 1, PAGE_LIMIT_MAX):
            return INVALID
        if kind == "list":
            phases, labels, after = obj.get("phases", []), obj.get("labels", {}), obj.get("after", "")
            ok = (
                isinstance(phases, list)
                and len(phases) <= PHASES_MAX
                and all(isinstance(p, str) and p in {x.value for x in Phase} for p in phases)
                and isinstance(labels, dict)
                and all(isinstance(v, str) for v in labels.values())
                and isinstance(obj.get("include_deleted", False), bool)
                and isinstance(after, str)
                and (after == "" or is_valid_name(after))
            )
            return ACCEPTED | INVALID if ok else INVALID  # a label key may break its pattern
        name = obj.get("name")
        if not isinstance(name, str) or not is_valid_name(name):
            return INVALID
        if kind == "history" and not _int_in(obj.get("after", 0), 0, 2**63 - 1):
            return INVALID
        return ACCEPTED if name == target else NOT_FOUND

    @st.composite
    def bad_query(draw: Callable[..., Any]) -> Case:
        kind = draw(st.sampled_from(QUERIES))
        payload = draw(
            st.binary(max_size=200)
            | text(max_size=60).map(str.encode)
            | JSON_VALUES.map(dumps)
            | st.fixed_dictionaries({"name": bad_names | fresh_names | st.just(target)}).map(dumps)
            | st.fixed_dictionaries({"name": st.integers() | st.none() | st.lists(text(), max_size=2)}).map(dumps)
            | st.fixed_dictionaries(
                {},
                optional={
                    "name": st.just(target) | fresh_names,
                    "phases": text(max_size=5)
                    | st.lists(
                        st.integers() | st.none() | st.sampled_from([p.value for p in Phase]) | text(max_size=8),
                        max_size=10,
                    ),
                    "labels": st.lists(text(max_size=3), max_size=2)
                    | st.dictionaries(text(max_size=3), st.integers() | text(max_size=3), max_size=3),
                    "include_deleted": st.booleans() | st.integers() | text(max_size=3) | st.none(),
                    "after": bad_names | fresh_names | st.integers(-5, 10**20) | st.none(),
                    "limit": st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, PAGE_LIMIT_MAX, PAGE_LIMIT_MAX + 1]),
                },
            ).map(dumps)
        )
        return Case("bad query", subjects.query(kind), payload, query_expectation(kind, payload))

    @st.composite
    def forged_entry(draw: Callable[..., Any]) -> Case:
        name = draw(st.sampled_from([target, spare]))
        choice = draw(st.integers(0, 3))
        if choice == 0:
            data = draw(st.binary(max_size=300))
        elif choice == 1:
            data = forged(name, SandboxStopped(exit_code=draw(st.integers(-1, 255))))
        elif choice == 2:
            data = forged(spare if name == target else target, SandboxStopRequested(sandbox_id="x", driver="podman"))
        else:
            data = dumps(draw(JSON_VALUES))
        return Case("forged log entry", subjects.log(name), data, frozenset(), publish=True)

    @st.composite
    def forged_fact(draw: Callable[..., Any]) -> Case:
        name = draw(st.sampled_from([target, spare, "px-nobody"]))
        choice = draw(st.integers(0, 4))
        if choice == 0:
            data = draw(st.binary(max_size=300))
        elif choice == 1:
            data = forged(
                name, ContainerExited(exit_code=draw(st.integers(0, 255)), sandbox_id=draw(text(max_size=10)))
            )
        elif choice == 2:
            data = forged(name, ContainerStarted(incarnation=draw(text(max_size=30)), sandbox_id="someone-else"))
        elif choice == 3:
            data = forged(name, DriverFailed(operation=draw(text(max_size=10)), message=draw(text(max_size=50))))
        else:
            data = forged(name, ContainerOrphaned(reason=draw(text(max_size=50))))
        return Case("forged fact", subjects.fact(name), data, frozenset(), publish=True)

    def near_max(size: int, shape: int) -> Case:
        """Poison of exactly ``size`` bytes, up to the max payload itself."""
        shapes: list[tuple[str, Any, frozenset[str]]] = [
            ("sandboxctl.cmd.stop", None, INVALID),  # raw bytes
            ("sandboxctl.cmd.create", body("create", name="../x", labels={"k": PAD}), INVALID),
            ("sandboxctl.cmd.create", body("create", name="px-big", image=" ", command=[PAD]), INVALID),
            ("sandboxctl.cmd.stop", body("stop", name="px-big", actor=PAD), INVALID),
            ("sandboxctl.cmd.start", body("stop", name=target, correlation_id=PAD), INVALID),
            ("sandboxctl.cmd.stop", body("stop", name=PAD), INVALID),
            ("sandboxctl.cmd.touch", body("touch", name=target, command_id=PAD), INVALID),
            ("sandboxctl.cmd.delete", [PAD], INVALID),
            ("sandboxctl.query.get", {"name": PAD}, INVALID),
            ("sandboxctl.query.history", {"name": 1, "pad": PAD}, INVALID),
            ("sandboxctl.query.list", {"phases": [PAD, 1]}, INVALID),
            ("sandboxctl.query.list", {"after": PAD}, INVALID),
        ]
        subject, obj, codes = shapes[shape % len(shapes)]
        payload = b"\x00" + b"p" * (size - 1) if obj is None else filled(obj, size)
        assert len(payload) == size <= max_payload
        return Case("near max payload", subject, payload, codes)

    def above_max(size: int, shape: int) -> Case:
        pad = "p" * size
        cases = [
            ("sandboxctl.cmd.create", dumps(body("create", name="px-big", labels={"k": pad}))),
            ("sandboxctl.cmd.stop", pad.encode()),
            ("sandboxctl.query.list", dumps({"phases": [pad]})),
        ]
        subject, payload = cases[shape % len(cases)]
        assert len(payload) > max_payload
        return Case("above max payload", subject, payload, frozenset())

    return query_expectation, {
        "garbage bytes": st.builds(
            lambda s, p: Case("garbage bytes", s, p, INVALID), any_subject, st.binary(min_size=1)
        ),
        "text that is not JSON": st.builds(
            lambda s, t: Case("text that is not JSON", s, t.encode("utf-8", "surrogatepass"), INVALID),
            any_subject,
            st.text(min_size=1, max_size=100).filter(lambda t: not _is_json_object(t)),
        ),
        "JSON of the wrong shape": st.builds(
            lambda s, v: Case("JSON of the wrong shape", s, dumps(v), INVALID),
            st.one_of(verbs.map(to), odd_subjects),
            JSON_VALUES,
        ),
        "unknown type": unknown_type(),
        "field of the wrong type": wrong_type(),
        "field out of range": out_of_range(),
        "field just over its bound": over_bound(),
        "field at its bound": at_bound(),
        "create at its bounds": create_at_bound(),
        "missing field": missing(),
        "misrouted command": misrouted(),
        "undocumented subject": undocumented(),
        "invalid name": invalid_name(),
        "no such sandbox": no_such_sandbox(),
        "id used again with another command": reused(),
        "bad query": bad_query(),
        "forged log entry": forged_entry(),
        "forged fact": forged_fact(),
        "near max payload": st.builds(
            near_max, st.just(max_payload) | st.integers(900 * 1024, max_payload), st.integers(0, 11)
        ),
        "above max payload": st.builds(
            above_max, st.integers(max_payload + 1, max_payload + 256 * 1024), st.integers(0, 2)
        ),
    }


NON_DESTRUCTIVE = ("touch", "lease_acquire", "lease_renew", "lease_release", "hold", "unhold")


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_json_object(text_: str) -> bool:
    try:
        return isinstance(json.loads(text_), dict)
    except ValueError:
        return False


def forged(name: str, event: object) -> bytes:
    return encode(
        Envelope(
            id=f"forged-{new_id()}", type=type_name(type(event)), source="poison", subject=name, time=now(), data=event
        )
    )


# -- the probe ---------------------------------------------------------------------------


@dataclass
class Probe:
    """Sends cases from hypothesis' thread through the event loop the plane runs on, and keeps count."""

    loop: asyncio.AbstractEventLoop
    nc: nats.NATS
    tried: int = 0
    hangs: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    families: Counter[str] = field(default_factory=Counter)
    accepted: list[tuple[Case, Any]] = field(default_factory=list)
    published: list[tuple[str, int]] = field(default_factory=list)  # forged entries: (subject, stream seq)
    holders: set[str] = field(default_factory=set)
    refused_client_side: int = 0
    expect_query: Callable[[str, bytes], frozenset[str]] = lambda kind, payload: INVALID

    async def _request(self, case: Case) -> bytes | Exception:
        try:
            if case.publish:
                ack = await self.nc.jetstream().publish(case.subject, case.payload)
                self.published.append((case.subject, ack.seq))
                return b""
            if case.before:
                first = await self.nc.request(subjects.command("touch"), case.before, timeout=REQUEST_TIMEOUT)
                assert reply_decoder.decode(first.data).accepted, first.data
            msg = await self.nc.request(case.subject, case.payload, timeout=REQUEST_TIMEOUT)
        except Exception as exc:
            return exc
        return msg.data

    def check(self, case: Case) -> None:
        self.tried += 1
        self.families[case.family] += 1
        outcome = asyncio.run_coroutine_threadsafe(self._request(case), self.loop).result(REQUEST_TIMEOUT + 30)
        if len(case.payload) > self.nc.max_payload:
            assert isinstance(outcome, nats.errors.MaxPayloadError), f"{case!r}: oversize publish gave {outcome!r}"
            self.refused_client_side += 1
            return
        if case.publish:
            assert outcome == b"", f"{case!r}: the stream did not store it: {outcome!r}"
            return
        if isinstance(outcome, Exception):
            self.hangs.append(f"{case!r}: no reply ({outcome!r})")
            raise AssertionError(self.hangs[-1])
        codes = case.codes
        if case.subject.startswith(subjects.QUERY + "."):
            codes = self.expect_query(case.subject.removeprefix(subjects.QUERY + "."), case.payload)
        raw = json.loads(outcome)
        assert isinstance(raw, dict) and isinstance(raw.get("accepted"), bool), f"{case!r}: reply {outcome[:300]!r}"
        reply = reply_decoder.decode(outcome)
        if reply.accepted:
            assert "accepted" in codes, f"{case!r}: accepted: {outcome[:300]!r}"
            self.errors["accepted"] += 1
            self.accepted.append((case, reply))
            data = json.loads(case.payload) if case.subject.startswith(subjects.COMMANDS) else {}
            if data.get("type") == "sandboxctl.command.hold.v1":
                self.holders.add(data["holder"])
            return
        assert reply.error is not None and isinstance(raw.get("error"), dict), f"{case!r}: {outcome[:300]!r}"
        code, message = str(reply.error.code), reply.error.message
        self.errors[code] += 1
        assert code in codes, f"{case!r}: code {code!r} ({message[:300]}); expected one of {sorted(codes)}"
        assert message.strip(), f"{case!r}: empty message"


def run_families(probe: Probe, families: dict[str, SearchStrategy[Case]]) -> None:
    for family, strategy in families.items():

        @settings(
            max_examples=max(1, math.ceil(EXAMPLES[family] * SCALE)),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def poison_is_refused(case: Case) -> None:
            probe.check(case)

        poison_is_refused()


async def usable(client: SandboxClient, name: str, engine: Any) -> None:
    """The sandbox stops and starts again, and the engine agrees with each phase."""
    item = await client.get(name)
    if item["phase"] != "Ready":
        reply = await client.start(name)
        await client.wait_for(name, "Ready", reply.seq, timeout=60)
    reply = await client.stop(name, timeout=5)
    await client.wait_for(name, "Stopped", reply.seq, timeout=60)
    assert engine.state(name)["Running"] is False
    reply = await client.start(name)
    await client.wait_for(name, "Ready", reply.seq, timeout=60)
    assert engine.state(name)["Running"] is True


async def test_ten_thousand_poisoned_inputs_get_structured_answers_and_every_sandbox_stays_usable(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str, engines: dict[str, Any]
) -> None:
    started = time.monotonic()
    target, spare = names.new("target"), names.new("spare")
    for name in (target, spare):
        await client.create(name, image, command=SLEEPER, driver="podman")
        await client.wait_for(name, "Ready")

    nc = await nats.connect(config.nats_url)
    probe = Probe(asyncio.get_running_loop(), nc)
    try:
        await poison_and_check(probe, plane, client, target, spare, engines, started)
    finally:
        await nc.close()
        for case, reply in probe.accepted:  # the sandboxes poison made at their bounds, gone whatever happened
            if case.family == "create at its bounds":
                engines["podman"].remove(reply.sandbox)


async def poison_and_check(
    probe: Probe,
    plane: ControlPlane,
    client: SandboxClient,
    target: str,
    spare: str,
    engines: dict[str, Any],
    started: float,
) -> None:
    nc = probe.nc
    probe.expect_query, families = strategies(target, spare, nc.max_payload)
    await asyncio.to_thread(run_families, probe, families)
    elapsed = time.monotonic() - started
    # No crash: every long-running task of every service is still running.
    services = [plane.statemachine, plane.projector, plane.query, plane.reaper, *plane.workers]
    assert all(not task.done() for service in services for task in service.tasks)
    assert probe.hangs == []
    assert probe.tried >= 10_000 * min(SCALE, 1), probe.tried

    # Every accepted command's events are in the log where its reply says.
    js = plane.statemachine.js
    for case, reply in probe.accepted:
        if not case.subject.startswith(subjects.COMMANDS) or not reply.appended:
            continue
        stored = await js.get_msg(subjects.LOG_STREAM, reply.seq)
        assert stored.subject == subjects.log(reply.sandbox), (case, reply)
        assert json.loads(stored.data)["causationid"] == json.loads(case.payload)["command_id"], (case, reply)

    # The log's only violations are the forged entries.
    _, violations = await audit.verify(js)
    forged_seqs = {seq for subject, seq in probe.published if subject.startswith(subjects.LOG)}
    assert {v.seq for v in violations} <= forged_seqs, [v for v in violations if v.seq not in forged_seqs][:5]

    # Every sandbox poison touched is still usable: holds released, it stops and starts.
    for holder in probe.holders:
        await client.unhold(target, holder)
    await client.unhold(target, "poison")
    for name in (target, spare):
        await usable(client, name, engines["podman"])
    for case, reply in probe.accepted:  # made at their bounds, and deleted like any other
        if case.family == "create at its bounds":
            deleted = await client.delete(reply.sandbox)
            await client.wait_for(reply.sandbox, "Deleted", deleted.seq, timeout=60)
    replies = sum(probe.errors.values())
    print(
        f"\npoison: {probe.tried} inputs in {elapsed:.0f}s: {replies} structured replies, "
        f"{len(probe.published)} forged entries and facts stored, {probe.refused_client_side} over the "
        f"{plane.statemachine.nc.max_payload}-byte max payload refused by the client; hangs {len(probe.hangs)}, "
        f"crashes 0; log violations {len(violations)} (all forged); sandboxes usable {target}, {spare}"
    )
    print(f"poison: answers {dict(sorted(probe.errors.items()))}")
    print("poison: per family " + ", ".join(f"{k} {v}" for k, v in probe.families.items()))


# -- known bugs, pinned ------------------------------------------------------------------


async def _ask(nc: nats.NATS, subject: str, payload: bytes) -> tuple[str, str]:
    try:
        msg = await nc.request(subject, payload, timeout=2)
    except Exception as exc:
        return "no reply", repr(exc)
    reply = reply_decoder.decode(msg.data)
    assert reply.error is not None, msg.data
    return str(reply.error.code), reply.error.message


async def test_regression_wildcard_names_are_invalid_not_looked_up_as_subjects(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    await client.create(names.new(), image, command=SLEEPER)  # the log must hold some other sandbox
    nc = await nats.connect(config.nats_url)
    try:
        got = [
            await _ask(nc, subjects.command(verb), dumps(body(verb, name=name, image="busybox")))
            for name in ("*", ">")
            for verb in VERBS
        ]
    finally:
        await nc.close()
    assert [code for code, _ in got] == ["invalid_argument"] * len(got), got


async def test_regression_a_trailing_newline_makes_a_name_invalid(config: Config, plane: ControlPlane) -> None:
    nc = await nats.connect(config.nats_url)
    try:
        got = [
            await _ask(nc, subjects.command(verb), dumps(body(verb, name="x\n", image="busybox", driver="podman")))
            for verb in VERBS
        ]
    finally:
        await nc.close()
    assert [code for code, _ in got] == ["invalid_argument"] * len(got), got


async def test_regression_a_huge_name_still_gets_a_reply(config: Config, plane: ControlPlane) -> None:
    nc = await nats.connect(config.nats_url)
    try:
        name = "x" * (600 * 1024)
        got = [
            await _ask(nc, subjects.command("stop"), dumps(body("stop", name=name))),
            await _ask(nc, subjects.command("create"), dumps(body("create", name=name, image="busybox"))),
            await _ask(nc, subjects.query("get"), dumps({"name": name})),
            await _ask(nc, subjects.query("history"), dumps({"name": name})),
        ]
    finally:
        await nc.close()
    assert [code for code, _ in got] == ["invalid_argument"] * 4, [(code, message[:80]) for code, message in got]


async def test_regression_an_error_quoting_the_input_still_fits_the_max_payload(
    config: Config, plane: ControlPlane
) -> None:
    nc = await nats.connect(config.nats_url)
    try:
        size = nc.max_payload
        got = [
            # msgspec's message quotes the unknown tag: "malformed command: Invalid value 'ppp...' - at `$.type`"
            await _ask(nc, subjects.command("stop"), filled({"type": PAD, "name": "x", "command_id": "1"}, size)),
            # the verb check answers with ``sandbox`` = the name, before the name is validated
            await _ask(nc, subjects.command("start"), filled(body("stop", name=PAD), size)),
        ]
    finally:
        await nc.close()
    assert [code for code, _ in got] == ["invalid_argument"] * 2, [(code, message[:80]) for code, message in got]
