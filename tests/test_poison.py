"""Poison input on every command and query subject, against a real nats-server,
the real control plane and real podman.

Hypothesis generates what a careless or hostile client could publish: random
bytes, text that is not JSON, JSON of the wrong shape, unknown ``type`` tags,
fields of the wrong type, missing fields, commands sent to another verb's
subject, invalid names (empty, too long, bad characters, path traversal,
unicode, whitespace), invalid images, unknown drivers, and payloads near and
above the NATS max payload. Each goes to the subject with plain nats-py, as a
client in another language would send it.

Every input must be answered with a structured error whose code is one the
input deserves; nothing may reach the log; the services must keep running.

Hypothesis drives a synchronous property in a worker thread and hands each
example to the test's event loop, where the plane runs, so failures shrink
against the live services. The regression tests at the bottom pin the bugs this
suite found: wildcard names, a trailing newline, and replies too big to send
(an error quoting back a name or an input near the max payload).
"""

from __future__ import annotations

import asyncio
import json
import re
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
import nats
import nats.errors
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.strategies import SearchStrategy

from events import subjects
from events.replies import reply_decoder
from services import audit
from services.client import SandboxClient
from services.config import Config
from services.embedded import ControlPlane

VERBS = ("create", "stop", "start", "delete")
QUERIES = ("get", "list", "history")
ERROR_CODES = frozenset({"invalid_argument", "not_found", "already_exists", "failed_precondition"})
INVALID = frozenset({"invalid_argument"})
NOT_FOUND = frozenset({"not_found"})
REQUEST_TIMEOUT = 5.0
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]

# docs/architecture.md: "letters, digits, - and _, at most 63 characters, starting with a letter or digit".
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
NAME_CHARS = string.ascii_letters + string.digits + "-_"

# How many examples each family gets; the whole file runs in well under a minute.
EXAMPLES = {
    "garbage bytes": 60,
    "text that is not JSON": 40,
    "JSON of the wrong shape": 60,
    "unknown type": 40,
    "field of the wrong type": 80,
    "missing field": 30,
    "misrouted command": 30,
    "invalid name": 120,
    "invalid image": 30,
    "unknown driver": 20,
    "no such sandbox": 30,
    "bad query": 80,
    "near max payload": 20,
    "above max payload": 8,
}


def is_valid_name(name: str) -> bool:
    return VALID_NAME.fullmatch(name) is not None


# -- cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str
    subject: str
    payload: bytes
    codes: frozenset[str]  # the error codes this input deserves

    def __repr__(self) -> str:
        shown = self.payload if len(self.payload) <= 300 else self.payload[:200] + b"...%d bytes" % len(self.payload)
        return f"Case({self.family!r}, {self.subject!r}, {shown!r}, {sorted(self.codes)})"


def command(verb: str, **fields: Any) -> dict[str, Any]:
    return {"type": f"sandboxctl.command.{verb}.v1", "command_id": uuid.uuid4().hex, "actor": "poison", **fields}


def dumps(obj: Any, ascii_only: bool = True) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


PAD = "@PAD@"  # stands for the padding in a body that ``filled`` brings to an exact size


def filled(body: Any, size: int) -> bytes:
    """``body`` as JSON of exactly ``size`` bytes, its PAD replaced by as many "p" as that takes."""
    raw = dumps(body)
    return raw.replace(PAD.encode(), b"p" * (size - len(raw) + len(PAD)))


def text(**kwargs: Any) -> SearchStrategy[str]:
    """Text without lone surrogates, so Python's json and msgspec read it alike."""
    return st.text(alphabet=st.characters(exclude_categories=("Cs",)), **kwargs)


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text()
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(max_size=8), inner, max_size=4)
)

BAD_NAMES = [
    "",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\x00",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "/x",
    "x/",
    "a/b",
    "a\\b",
    "%2e%2e%2fx",
    "a.b",
    "a.*",
    "a.>",
    "a*",
    "$SYS",
    "-x",
    "_x",
    " x",
    "x ",
    "a b",
    "x\r",
    "x\t",
    "x\x00",
    "x\u200b",
    "x\u00a0",
    "\u3000",
    "é",
    "naïve",
    "名前",
    "😀",
    "x" * 64,
    "x" * 1000,
]


def strategies(sandbox: str, max_payload: int) -> dict[str, SearchStrategy[Case]]:
    """Every family of poison; ``sandbox`` is a live sandbox that malformed input may name."""

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
    any_names = st.one_of(fresh_names, bad_names, st.just(sandbox))
    images = st.sampled_from(["localhost/sandboxctl-busybox:latest", "busybox", "x"])
    blanks = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000", max_size=8)
    verbs = st.sampled_from(VERBS)

    def to(verb: str) -> str:
        return subjects.command(verb)

    any_command_subject = st.one_of(verbs.map(to), st.sampled_from(["sandboxctl.cmd.nope", "sandboxctl.cmd.a.b"]))

    @st.composite
    def wrong_type(draw: Callable[..., Any]) -> Case:
        verb = draw(verbs)
        fields: dict[str, Any] = {"name": draw(any_names)}
        if verb == "create":
            fields |= {"image": draw(images), "driver": "podman", "labels": {"team": "red"}, "command": SLEEPER}
        if verb == "stop":
            fields["timeout"] = 5
        body = command(verb, **fields)
        field = draw(st.sampled_from(sorted(body)))
        if field == "timeout":
            value = draw(text() | st.lists(st.integers(), max_size=2) | st.dictionaries(text(max_size=3), st.none()))
        elif field == "command":
            value = draw(text() | st.integers() | st.lists(st.integers() | st.none(), min_size=1, max_size=3))
        elif field == "labels":
            value = draw(
                text()
                | st.lists(text(), max_size=2)
                | st.dictionaries(text(max_size=5), st.integers() | st.none() | st.lists(text()), min_size=1)
            )
        elif field == "type":
            value = draw(st.integers() | st.none() | st.lists(text(), max_size=2) | st.booleans())
        else:
            value = draw(
                st.integers() | st.floats(allow_nan=False) | st.none() | st.booleans() | st.lists(text(), max_size=2)
            )
        body[field] = value
        return Case("field of the wrong type", to(verb), dumps(body), INVALID)

    @st.composite
    def missing(draw: Callable[..., Any]) -> Case:
        verb = draw(verbs)
        fields: dict[str, Any] = {"name": draw(fresh_names | st.just(sandbox))}
        if verb == "create":
            fields["image"] = draw(images)
        body = command(verb, **fields)
        required = ["type", "name", "command_id", *(["image"] if verb == "create" else [])]
        gone = draw(st.lists(st.sampled_from(required), min_size=1, unique=True))
        empty_id = draw(st.booleans()) and "command_id" not in gone
        for field in gone:
            del body[field]
        if empty_id:
            body["command_id"] = ""
        return Case("missing field", to(verb), dumps(body), INVALID)

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
        body = command("stop", name=draw(any_names), image="busybox")
        body["type"] = kind if kind not in known else kind + ".x"
        return Case("unknown type", draw(any_command_subject), dumps(body), INVALID)

    @st.composite
    def misrouted(draw: Callable[..., Any]) -> Case:
        verb = draw(verbs)
        fields: dict[str, Any] = {"name": draw(fresh_names | st.just(sandbox))}
        if verb == "create":
            fields |= {"image": "localhost/sandboxctl-busybox:latest", "driver": "podman"}
        subject = draw(st.sampled_from([v for v in VERBS if v != verb]).map(to) | st.just("sandboxctl.cmd.nope"))
        return Case("misrouted command", subject, dumps(command(verb, **fields)), INVALID)

    @st.composite
    def invalid_name(draw: Callable[..., Any]) -> Case:
        verb = draw(verbs)
        fields: dict[str, Any] = {"name": draw(bad_names)}
        if verb == "create":
            fields |= {"image": "localhost/sandboxctl-busybox:latest", "driver": "podman", "command": SLEEPER}
        return Case("invalid name", to(verb), dumps(command(verb, **fields), draw(st.booleans())), INVALID)

    @st.composite
    def invalid_image(draw: Callable[..., Any]) -> Case:
        body = command("create", name=draw(fresh_names), image=draw(blanks), driver="podman")
        return Case("invalid image", to("create"), dumps(body, draw(st.booleans())), INVALID)

    @st.composite
    def unknown_driver(draw: Callable[..., Any]) -> Case:
        driver = draw(text(min_size=1, max_size=20).filter(lambda d: d not in ("podman", "docker")))
        body = command("create", name=draw(fresh_names), image="localhost/sandboxctl-busybox:latest", driver=driver)
        return Case("unknown driver", to("create"), dumps(body), INVALID)

    @st.composite
    def no_such_sandbox(draw: Callable[..., Any]) -> Case:
        verb = draw(st.sampled_from(["stop", "start"]))
        extra = {"timeout": draw(st.floats(0, 5))} if verb == "stop" else {}
        body = command(verb, name=draw(fresh_names), actor=draw(text(max_size=30)), **extra)
        return Case("no such sandbox", to(verb), dumps(body), NOT_FOUND)

    def query_expectation(kind: str, payload: bytes) -> frozenset[str] | None:
        """What a query deserves; None for a well-formed query that must be answered."""
        try:
            obj = json.loads(payload) if payload or kind != "list" else {}
        except (ValueError, UnicodeDecodeError):
            return INVALID
        if not isinstance(obj, dict):
            return INVALID
        if kind == "list":
            ok = (
                isinstance(obj.get("phases", []), list)
                and all(isinstance(p, str) for p in obj.get("phases", []))
                and isinstance(obj.get("labels", {}), dict)
                and all(isinstance(v, str) for v in obj.get("labels", {}).values())
                and isinstance(obj.get("include_deleted", False), bool)
            )
            return None if ok else INVALID
        name = obj.get("name")
        if not isinstance(name, str) or not is_valid_name(name):
            return INVALID
        return None if name == sandbox else NOT_FOUND

    @st.composite
    def bad_query(draw: Callable[..., Any]) -> Case:
        kind = draw(st.sampled_from(QUERIES))
        payload = draw(
            st.binary(max_size=200)
            | text(max_size=60).map(str.encode)
            | JSON_VALUES.map(dumps)
            | st.fixed_dictionaries({"name": bad_names | fresh_names}).map(dumps)
            | st.fixed_dictionaries({"name": st.integers() | st.none() | st.lists(text(), max_size=2)}).map(dumps)
            | st.fixed_dictionaries(
                {},
                optional={
                    "phases": text(max_size=5) | st.lists(st.integers() | st.none(), min_size=1, max_size=3),
                    "labels": st.lists(text(max_size=3), max_size=2)
                    | st.dictionaries(text(max_size=3), st.integers(), min_size=1, max_size=2),
                    "include_deleted": st.integers() | text(max_size=3) | st.none(),
                },
            ).map(dumps)
        )
        codes = query_expectation(kind, payload)
        assume(codes is not None)  # a well-formed query is answered, not refused
        return Case("bad query", subjects.query(kind), payload, codes)

    def near_max(size: int, shape: int) -> Case:
        """Poison of exactly ``size`` bytes, up to the max payload itself.

        The two shapes whose error quotes the input back (an unknown ``type``, a
        misrouted huge name) have a regression test of their own at the bottom.
        """
        shapes: list[tuple[str, Any, frozenset[str]]] = [
            ("sandboxctl.cmd.stop", None, INVALID),  # raw bytes
            ("sandboxctl.cmd.create", command("create", name="../x", image="busybox", labels={"k": PAD}), INVALID),
            ("sandboxctl.cmd.create", command("create", name="px-big", image=" ", command=[PAD]), INVALID),
            ("sandboxctl.cmd.stop", command("stop", name="px-big", actor=PAD), INVALID),  # actor is bounded
            ("sandboxctl.cmd.start", command("stop", name=sandbox, correlation_id=PAD), INVALID),
            ("sandboxctl.cmd.stop", command("stop", name=PAD), INVALID),
            ("sandboxctl.cmd.delete", [PAD], INVALID),
            ("sandboxctl.query.get", {"name": PAD}, INVALID),
            ("sandboxctl.query.history", {"name": 1, "pad": PAD}, INVALID),
            ("sandboxctl.query.list", {"phases": [PAD, 1]}, INVALID),
        ]
        subject, body, codes = shapes[shape % len(shapes)]
        payload = b"\x00" + b"p" * (size - 1) if body is None else filled(body, size)
        assert len(payload) == size <= max_payload
        return Case("near max payload", subject, payload, codes)

    def above_max(size: int, shape: int) -> Case:
        pad = "p" * size
        cases = [
            ("sandboxctl.cmd.create", dumps(command("create", name="px-big", image="busybox", labels={"k": pad}))),
            ("sandboxctl.cmd.stop", pad.encode()),
            ("sandboxctl.query.list", dumps({"phases": [pad]})),
        ]
        subject, payload = cases[shape % len(cases)]
        assert len(payload) > max_payload
        return Case("above max payload", subject, payload, frozenset())

    return {
        "garbage bytes": st.builds(lambda s, p: Case("garbage bytes", s, p, INVALID), any_command_subject, st.binary()),
        "text that is not JSON": st.builds(
            lambda s, t: Case("text that is not JSON", s, t.encode("utf-8", "surrogatepass"), INVALID),
            any_command_subject,
            st.text(max_size=100),
        ),
        "JSON of the wrong shape": st.builds(
            lambda s, v: Case("JSON of the wrong shape", s, dumps(v), INVALID), any_command_subject, JSON_VALUES
        ),
        "unknown type": unknown_type(),
        "field of the wrong type": wrong_type(),
        "missing field": missing(),
        "misrouted command": misrouted(),
        "invalid name": invalid_name(),
        "invalid image": invalid_image(),
        "unknown driver": unknown_driver(),
        "no such sandbox": no_such_sandbox(),
        "bad query": bad_query(),
        "near max payload": st.builds(
            near_max, st.just(max_payload) | st.integers(900 * 1024, max_payload), st.integers(0, 9)
        ),
        "above max payload": st.builds(
            above_max, st.integers(max_payload + 1, max_payload + 256 * 1024), st.integers(0, 2)
        ),
    }


# -- the probe ---------------------------------------------------------------------------


class Probe:
    """Sends cases from hypothesis' thread through the event loop the plane runs on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nc: nats.NATS) -> None:
        self.loop = loop
        self.nc = nc
        self.tried = 0
        self.errors: Counter[str] = Counter()
        self.families: Counter[str] = Counter()
        self.accepted: list[Case] = []
        self.refused_client_side = 0

    async def _request(self, case: Case) -> bytes | Exception:
        try:
            msg = await self.nc.request(case.subject, case.payload, timeout=REQUEST_TIMEOUT)
        except Exception as exc:
            return exc
        return msg.data

    def check(self, case: Case) -> None:
        self.tried += 1
        self.families[case.family] += 1
        outcome = asyncio.run_coroutine_threadsafe(self._request(case), self.loop).result(REQUEST_TIMEOUT + 10)
        if len(case.payload) > self.nc.max_payload:
            assert isinstance(outcome, nats.errors.MaxPayloadError), f"{case!r}: oversize publish gave {outcome!r}"
            self.refused_client_side += 1
            return
        assert not isinstance(outcome, Exception), f"{case!r}: no reply ({outcome!r})"
        raw = json.loads(outcome)
        assert isinstance(raw, dict) and isinstance(raw.get("error"), dict), f"{case!r}: reply {outcome[:300]!r}"
        reply = reply_decoder.decode(outcome)
        if reply.accepted:
            self.accepted.append(case)
        assert reply.accepted is False and raw.get("accepted", False) is False, f"{case!r}: accepted: {outcome!r}"
        assert reply.error is not None
        code, message = str(reply.error.code), reply.error.message
        self.errors[code] += 1
        assert code in ERROR_CODES, f"{case!r}: code {code!r}: {message}"
        assert code in case.codes, f"{case!r}: code {code!r} ({message}); expected one of {sorted(case.codes)}"
        assert message.strip(), f"{case!r}: empty message"


def run_families(probe: Probe, families: dict[str, SearchStrategy[Case]]) -> None:
    for family, strategy in families.items():

        @settings(
            max_examples=EXAMPLES[family],
            deadline=None,
            database=None,
            suppress_health_check=[
                HealthCheck.function_scoped_fixture,
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
            ],
        )
        @given(case=strategy)
        def poison_is_refused(case: Case) -> None:
            probe.check(case)

        poison_is_refused()


async def log_subjects(nc: nats.NATS) -> Counter[str]:
    seen: Counter[str] = Counter()
    async for _, envelope, msg in audit.events(nc.jetstream()):
        seen[subjects.name_of(msg.subject)] += 1
        assert not isinstance(envelope, Exception), f"unreadable log entry on {msg.subject}: {envelope}"
    return seen


async def test_poison_gets_a_structured_error_and_never_reaches_the_log(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    started = time.monotonic()
    before = names.new("before")
    await client.create(before, image, command=SLEEPER)
    await client.wait_for(before, "Ready")

    nc = await nats.connect(config.nats_url)
    try:
        probe = Probe(asyncio.get_running_loop(), nc)
        families = strategies(before, nc.max_payload)
        await asyncio.to_thread(run_families, probe, families)
    finally:
        await nc.close()

    # The services are still running, and still act.
    assert all(not task.done() for task in plane.statemachine.tasks)
    after = names.new("after")
    assert (await client.create(after, image, command=SLEEPER)).accepted
    await client.wait_for(after, "Ready")
    assert (await client.get(before))["phase"] == "Ready"

    # Nothing of the poison reached the log.
    count, violations = await audit.verify(plane.statemachine.js)
    assert violations == []
    seen = await log_subjects(plane.statemachine.nc)
    assert set(seen) == {before, after}, f"log has events of {sorted(set(seen) - {before, after})}"
    assert [e["type"] for e in await client.history(before)] == [
        "sandboxctl.sandbox.created.v1",
        "sandboxctl.sandbox.ready.v1",
    ]
    assert probe.accepted == []
    replies = sum(probe.errors.values())
    assert replies == probe.tried - probe.refused_client_side
    print(
        f"\npoison: {probe.tried} inputs tried, {replies} error replies, {len(probe.accepted)} accepted, "
        f"log violations {len(violations)}"
    )
    print(
        f"poison: codes {dict(sorted(probe.errors.items()))}; {probe.refused_client_side} over the "
        f"{nc.max_payload}-byte max payload refused by the client; log {count} events; "
        f"{time.monotonic() - started:.1f}s"
    )
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
            await _ask(nc, subjects.command(verb), dumps(command(verb, name=name, image="busybox")))
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
            await _ask(nc, subjects.command(verb), dumps(command(verb, name="x\n", image="busybox", driver="podman")))
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
            await _ask(nc, subjects.command("stop"), dumps(command("stop", name=name))),
            await _ask(nc, subjects.command("create"), dumps(command("create", name=name, image="busybox"))),
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
            await _ask(nc, subjects.command("start"), filled(command("stop", name=PAD), size)),
        ]
    finally:
        await nc.close()
    assert [code for code, _ in got] == ["invalid_argument"] * 2, [(code, message[:80]) for code, message in got]
