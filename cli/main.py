"""The ``sandboxctl`` command line.

Every command exits 0 on success. On a rejection, an error or a timeout it
prints one line, ``sandboxctl: <code>: <reason>``, to stderr and exits with the
code's number from EXIT_CODES, so scripts can branch without parsing text.
Input is checked against the bounds in events/limits.py before anything is
sent: a bad number, name, phase or label is ``invalid_argument`` (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec

from sandboxctl import auth
from sandboxctl.cli import spec
from sandboxctl.cli.fast import FAST_ENV
from sandboxctl.cli.output import BROKEN_PIPE, EXIT_CODES, HOST_COLUMNS, short_type, show, why
from sandboxctl.cli.progress import Progress
from sandboxctl.client import TERMINAL, PermissionDenied, SandboxClient, SandboxError
from sandboxctl.events import subjects
from sandboxctl.events.commands import BulkItem, BulkVerb
from sandboxctl.events.limits import (
    CONSTRAINTS_MAX,
    GRACE_MAX,
    HOLDER_MAX,
    IDLE_MAX,
    LABEL_KEY_PATTERN,
    REASON_MAX,
    TTL_MAX,
)
from sandboxctl.events.queries import ListRequest
from sandboxctl.events.replies import ErrorCode
from sandboxctl.observe import tracing
from sandboxctl.observe.address import parse_address
from sandboxctl.runtime.config import (
    ANSWER_TIMEOUT,
    CONSOLE_DEFAULT,
    CONSOLE_ENV,
    CONSOLE_SERVE_DEFAULT,
    CONSOLE_WHAT,
    TRACE_EXPORT_WAIT,
    Config,
    labels_from_pairs,
    parse_duration,
)
from sandboxctl.runtime.process import run_to_exit
from sandboxctl.statemachine.names import validate_name
from sandboxctl.statemachine.phases import Phase
from sandboxctl.statemachine.queries import list_problem

if TYPE_CHECKING:
    from sandboxctl.bus.reading import Point

# The longest a command waits for a phase (--timeout), or top sleeps between screens: a day.
WAIT_MAX = 86400.0

PHASE_CHOICES = ", ".join(p.value for p in Phase)
# The verbs that take NAMEs or --all, and wait for each sandbox's phase (client.TERMINAL).
BULK_VERBS = ("stop", "start", "pause", "resume", "archive", "delete")


class Failure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """Usage errors are failures like any other: one line, ``invalid_argument``, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise Failure(ErrorCode.INVALID_ARGUMENT, f"{self.prog}: {message} (see {self.prog} --help)")


_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


def _host_row(host: dict[str, Any]) -> dict[str, Any]:
    """A host as a table shows it: lists and sizes in a few characters each."""
    gib = host["memory"] / 2**30
    return {
        **host,
        "engines": ",".join(
            f"{e} ({host['acceleration']})" if e == "vm" and host.get("acceleration") else e for e in host["engines"]
        ),
        "labels": ",".join(f"{k}={v}" for k, v in sorted(host["labels"].items())),
        "capacity": f"{host['cpus']:g} CPU, {gib:.1f} GiB, {host['max_sandboxes']} sandboxes",
        "last_heartbeat": f"{host['last_heartbeat']:.0f}s ago",
    }


def _labels(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs as labels, within events/limits.py's bounds (a create's and a list's alike)."""
    try:
        return labels_from_pairs(pairs)
    except ValueError as exc:
        raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None


def _number(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value.is_integer() and abs(value) < 1e15 else f"{value:g}"


def _seconds(value: float, flag: str, high: float, zero: bool) -> float:
    """A number of seconds from the command line: finite, at most ``high``, and not negative (nor 0
    unless ``zero``)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or value > high:
        low = "from 0 to" if zero else "more than 0 and at most"
        raise Failure(
            ErrorCode.INVALID_ARGUMENT,
            f"{flag} must be {low} {_number(high)} seconds, not {_number(value)}",
        )
    return value


def _duration(text: str, what: str, high: float, zero: bool = True) -> float:
    """A duration (``90``, ``10m``, ``7d``) from the command line, in seconds, bounded like ``_seconds``."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise Failure(ErrorCode.INVALID_ARGUMENT, f"{what}: {exc}") from None
    return _seconds(seconds, what, high, zero)


def _check(args: argparse.Namespace) -> None:
    """What can be wrong with the arguments themselves, found before anything is sent: numbers
    out of range (NaN and infinity included), bad or repeated sandbox names, unknown phases,
    labels and texts over the bounds of events/limits.py."""
    if isinstance(getattr(args, "timeout", None), float):
        _seconds(args.timeout, "--timeout", WAIT_MAX, zero=False)
    if args.cmd == "stop":
        _seconds(args.grace, "--grace", GRACE_MAX, zero=True)
    if args.cmd == "top":
        _seconds(args.interval, "--interval", WAIT_MAX, zero=False)
    if args.cmd == "status":
        _seconds(args.wait, "--wait", WAIT_MAX, zero=False)
    if args.cmd in ("exec", "shell", "logs", "cp"):
        _seconds(args.engine_timeout, "--engine-timeout", WAIT_MAX, zero=False)
    for flag, limit in (("reason", REASON_MAX), ("holder", HOLDER_MAX)):
        if len(getattr(args, flag, None) or "") > limit:
            raise Failure(ErrorCode.INVALID_ARGUMENT, f"--{flag} is longer than {limit} characters")
    names = list(getattr(args, "names", None) or [])
    if args.cmd in BULK_VERBS:
        args.selector_labels = _labels(args.selector)
        if sum(map(bool, (names, args.all, args.selector_labels))) > 1:
            raise Failure(ErrorCode.INVALID_ARGUMENT, "give names, --all or --selector: one of them")
        if not names and not args.all and not args.selector_labels:
            raise Failure(ErrorCode.INVALID_ARGUMENT, f"{args.cmd} needs at least one NAME, --selector or --all")
        if args.host and names:
            raise Failure(ErrorCode.INVALID_ARGUMENT, "--host goes with --all or --selector, not with names")
    if isinstance(getattr(args, "name", None), str) and args.cmd != "user":
        names.append(args.name)
    seen: set[str] = set()
    for name in names:
        problem = validate_name(name)
        if problem:
            raise Failure(ErrorCode.INVALID_ARGUMENT, problem)
        if name in seen:
            raise Failure(ErrorCode.INVALID_ARGUMENT, f"sandbox {name} is named twice")
        seen.add(name)
    # Parsed here, once, so that nothing is sent (nor any connection made) with a bad one.
    try:
        args.expected_seq = spec.expected_seq(getattr(args, "if_seq", None))
        if args.cmd in ("create", "update", "clone"):
            args.resources = spec.resources(args.cpus, args.memory, args.pids)
        if args.cmd in ("create", "clone"):
            args.env = spec.environment(args.env_pair, args.env_file)
    except ValueError as exc:
        raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
    if (
        args.expected_seq is not None
        and args.cmd in BULK_VERBS
        and (args.all or args.selector_labels or len(names) > 1)
    ):
        raise Failure(ErrorCode.INVALID_ARGUMENT, "--if-seq names one sandbox's log sequence: give one NAME")
    if args.cmd in ("create", "clone", "update"):
        args.idle_timeout_seconds = (
            None if args.idle_timeout is None else _duration(args.idle_timeout, "--idle-timeout", IDLE_MAX)
        )
    if args.cmd in ("create", "clone"):
        args.labels = _labels(args.label)
    if args.cmd == "create":
        args.constraints = _labels(args.constraint)
        if len(args.constraints) > CONSTRAINTS_MAX:
            raise Failure(ErrorCode.INVALID_ARGUMENT, f"{len(args.constraints)} constraints: at most {CONSTRAINTS_MAX}")
        args.auto_delete_seconds = _duration(args.auto_delete_after, "--auto-delete-after", IDLE_MAX)
        args.auto_archive_seconds = _duration(args.auto_archive_after, "--auto-archive-after", IDLE_MAX)
    if args.cmd == "clone":
        problem = validate_name(args.source)
        if problem:
            raise Failure(ErrorCode.INVALID_ARGUMENT, problem)
    if args.cmd == "update":
        removed = [pair[:-1] for pair in args.label if pair.endswith("-") and "=" not in pair]
        args.labels = _labels([pair for pair in args.label if not (pair.endswith("-") and "=" not in pair)])
        for key in removed:
            _labels([f"{key}="])  # the same rules for a key to remove
        args.remove_labels = removed
        if not (args.resources or args.labels or removed or args.idle_timeout_seconds is not None or args.idle_action):
            raise Failure(
                ErrorCode.INVALID_ARGUMENT,
                "update needs something to change: --cpus, --memory, --pids, --label, --idle-timeout or --idle-action",
            )
    if args.cmd == "lease" and args.lease_cmd != "release":
        args.ttl_seconds = _duration(args.ttl, "--ttl", TTL_MAX, zero=False)
    if args.cmd == "list":
        args.labels = _labels(args.label)
        try:  # the query service's own check of a list request
            request = msgspec.convert({"phases": args.phase, "labels": args.labels, "host": args.host}, ListRequest)
        except msgspec.ValidationError as exc:
            raise Failure(ErrorCode.INVALID_ARGUMENT, f"list: {exc}") from None
        problem = list_problem(request)
        if problem:
            raise Failure(ErrorCode.INVALID_ARGUMENT, problem)


METRICS_HELP = (
    "serve Prometheus metrics at HOST:PORT (port 0: a free one; off: none); default SANDBOXCTL_METRICS, "
    "else 127.0.0.1:0. The address is printed once the services are up"
)


CONSOLE_HELP = (
    "serve the web console at HOST:PORT (port 0: a free one; off: none); default SANDBOXCTL_CONSOLE, "
    "else 127.0.0.1:4280 for up and a free port for serve. The address is printed once the services are up "
    "(docs/console.md)"
)


class _Unused:
    """Stands in for the parser of a verb that is not being run, and takes every call made to it:
    argparse builds each parser eagerly, and building all of them costs more than a ``get``."""

    def __getattr__(self, name: str) -> Callable[..., _Unused]:
        return self._take

    def _take(self, *args: Any, **kwargs: Any) -> _Unused:
        return self


class _Verbs:
    """The top parser's verbs, of which only ``verb`` (every one, when None) is built."""

    def __init__(self, sub: Any, verb: str | None) -> None:
        self.sub, self.verb, self.built = sub, verb, False

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self.verb is not None and name != self.verb:
            return _Unused()
        self.built = True
        return self.sub.add_parser(name, **kwargs)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole command line's parser; given the verb being run, that verb's alone (any other
    word, or none, gets the whole parser, which says what is known)."""
    p = _Parser(prog="sandboxctl", description="Create, stop, start and delete sandboxes.")
    verbs = _Verbs(p.add_subparsers(dest="cmd", required=True), verb)
    _add_verbs(verbs)
    return p if verbs.built or verb is None else build_parser()


def _add_verbs(sub: _Verbs) -> None:

    up = sub.add_parser("up", help="run nats-server, podman and every service on embedded defaults")
    up.add_argument("--port", type=int, default=4222, help="NATS port (default 4222)")
    up.add_argument("--sync-always", action="store_true", help="fsync every JetStream write (slower, safer)")
    up.add_argument(
        "--cluster",
        type=int,
        default=1,
        choices=(1, 3, 5),
        metavar="N",
        help="run N nats-server nodes (1, 3 or 5) routed into one cluster on ports PORT.., every stream on 3 "
        "replicas (default 1: a single server)",
    )
    up.add_argument("--metrics", metavar="HOST:PORT", help=METRICS_HELP)
    up.add_argument("--console", metavar="HOST:PORT", help=CONSOLE_HELP)

    serve = sub.add_parser("serve", help="run the services against the NATS in SANDBOXCTL_NATS_URL")
    serve.add_argument(
        "--only",
        default="",
        metavar="COMPONENT[,...]",
        help="run only these: statemachine, projector, query, worker, reaper, webhooks, console (default: all)",
    )
    serve.add_argument("--metrics", metavar="HOST:PORT", help=METRICS_HELP)
    serve.add_argument("--console", metavar="HOST:PORT", help=CONSOLE_HELP)

    st = sub.add_parser(
        "status", help="each service's health and position in the log; exits 8 if one is down or behind"
    )
    st.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    st.add_argument("--wait", type=float, default=1.0, metavar="S", help="seconds to gather answers (default 1)")

    def engine_timeout(sp: argparse.ArgumentParser, before: str) -> None:
        sp.add_argument(
            "--engine-timeout",
            type=float,
            default=ANSWER_TIMEOUT,
            metavar="S",
            help=f"seconds the engine may take to answer before {before} (default {ANSWER_TIMEOUT:g})",
        )

    def if_seq(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--if-seq",
            metavar="N",
            help="only if the sandbox is still at log sequence N (last_seq, as get shows it); "
            "else exit 6 (conflict) and nothing is done",
        )

    def waiting(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the phase (default 120)")
        sp.add_argument("--no-wait", action="store_true", help="return once the command is accepted")

    c = sub.add_parser(
        "create",
        help="create a sandbox and wait until it is Ready",
        usage="sandboxctl create NAME --image IMG [options] [-- CMD...]",
    )
    c.add_argument("name")
    c.add_argument("--image", required=True)
    c.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--driver", default="", help="podman or docker (default: configured, else first found)")
    c.add_argument("--host", default="", metavar="NAME", help="run it on this host (default: the one with most room)")
    c.add_argument(
        "--constraint",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run it on a host whose labels carry this (repeatable: all must match)",
    )
    c.add_argument(
        "--idle-timeout",
        metavar="DURATION",
        help="stop it (never delete it) after this long idle, e.g. 30m; 0 never (default: SANDBOXCTL_IDLE_TIMEOUT)",
    )
    c.add_argument(
        "--auto-delete-after",
        metavar="DURATION",
        default="0",
        help="DESTROYS THE WORKSPACE: delete it once Stopped this long, e.g. 7d (default 0: never)",
    )
    c.add_argument(
        "--auto-archive-after",
        metavar="DURATION",
        default="0",
        help="archive it (workspace into the object store, volume freed) once Stopped this long, e.g. 7d; "
        "start restores it (default 0: never)",
    )
    c.add_argument(
        "--idle-action",
        choices=("stop", "pause"),
        default="stop",
        help="what happens once it is idle past --idle-timeout: stop it, or pause it (memory kept); default stop",
    )
    c.add_argument("--cpus", metavar="N", help="CPUs it may use, e.g. 1.5 (default: no limit)")
    c.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 512m or 2g (default: no limit)")
    c.add_argument("--pids", metavar="N", help="the most processes it may run (default: no limit)")
    c.add_argument(
        "--env",
        "-e",
        dest="env_pair",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable (repeatable). Written to the log in clear: NEVER PASS SECRETS THIS WAY",
    )
    c.add_argument(
        "--env-file",
        action="append",
        default=[],
        metavar="FILE",
        help="KEY=VALUE lines (# comments) as environment variables; in the log in clear like --env",
    )
    if_seq(c)
    waiting(c)

    cl = sub.add_parser(
        "clone",
        help="a new sandbox with a copy of another's workspace, image, resources, env and labels",
        usage="sandboxctl clone SRC NEW [--image IMG] [--label K=V] [--env K=V] [--cpus N] ... [-- CMD...]",
    )
    cl.add_argument("source", metavar="SRC")
    cl.add_argument("name", metavar="NEW")
    cl.add_argument("--image", default="", help="another image (default: the source's)")
    cl.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="set over the source's labels")
    cl.add_argument("--env", "-e", dest="env_pair", action="append", default=[], metavar="KEY=VALUE")
    cl.add_argument("--env-file", action="append", default=[], metavar="FILE")
    cl.add_argument("--cpus", metavar="N")
    cl.add_argument("--memory", metavar="SIZE")
    cl.add_argument("--pids", metavar="N")
    cl.add_argument("--idle-timeout", metavar="DURATION")
    cl.add_argument("--idle-action", choices=("stop", "pause"))
    if_seq(cl)
    waiting(cl)

    u = sub.add_parser(
        "update",
        help="change a sandbox's resources (while Stopped), labels or idle timeout",
        usage="sandboxctl update NAME [--cpus N] [--memory SIZE] [--pids N] [--label K=V|K-]... [--idle-timeout D]",
    )
    u.add_argument("name")
    u.add_argument("--cpus", metavar="N", help="CPUs it may use (only while nothing runs: the next start applies it)")
    u.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 1g (only while nothing runs)")
    u.add_argument("--pids", metavar="N", help="the most processes it may run (only while nothing runs)")
    u.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE|KEY-", help="set a label, or remove one (KEY-)"
    )
    u.add_argument("--idle-timeout", metavar="DURATION", help="stop it after this long idle; 0 never")
    u.add_argument("--idle-action", choices=("stop", "pause"), help="stop or pause it once idle")
    if_seq(u)

    t = sub.add_parser("touch", help="record use of a sandbox: its idle clock starts again")
    t.add_argument("name")
    if_seq(t)

    lease = sub.add_parser("lease", help="keep a sandbox from being auto-stopped while you hold a lease")
    lsub = lease.add_subparsers(dest="lease_cmd", required=True)
    for verb in ("acquire", "renew", "release"):
        sp = lsub.add_parser(verb)
        sp.add_argument("name")
        sp.add_argument("--holder", default="", help="who holds it (default: SANDBOXCTL_ACTOR, else $USER)")
        if verb != "release":
            sp.add_argument("--ttl", default="10m", metavar="DURATION", help="how long it lasts (default 10m)")
        if_seq(sp)

    h = sub.add_parser("hold", help="place a stop hold: the sandbox cannot start until it is released")
    h.add_argument("name")
    h.add_argument("--holder", default="", help="who holds it (default: SANDBOXCTL_ACTOR, else $USER)")
    h.add_argument("--reason", default="")
    if_seq(h)
    uh = sub.add_parser("unhold", help="release a stop hold")
    uh.add_argument("name")
    uh.add_argument("--holder", default="")
    if_seq(uh)

    for verb, helptext in (
        ("exec", "run a command in a sandbox, starting it first if it is Stopped"),
        ("shell", "an interactive shell in a sandbox, starting it first if it is Stopped"),
    ):
        sp = sub.add_parser(
            verb, help=helptext, usage=f"sandboxctl {verb} NAME [options]" + (" -- CMD..." if verb == "exec" else "")
        )
        sp.add_argument("name")
        sp.add_argument("--no-start", action="store_true", help="refuse instead of starting a Stopped sandbox")
        sp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for Ready (default 120)")
        if verb == "shell":
            sp.add_argument("--shell", default="sh", help="the shell to run (default sh)")
        else:
            sp.add_argument(
                "--no-stdin",
                "-n",
                action="store_true",
                help="do not forward piped standard input (a terminal never is): the command reads an empty one",
            )
        engine_timeout(sp, "the command starts")

    cp = sub.add_parser(
        "cp",
        help="copy files or directories between a sandbox and here (it need not run)",
        usage="sandboxctl cp LOCAL NAME:PATH | sandboxctl cp NAME:PATH LOCAL",
    )
    cp.add_argument("source", metavar="SOURCE")
    cp.add_argument("destination", metavar="DEST")
    engine_timeout(cp, "the copy starts")

    lg = sub.add_parser("logs", help="the container's output")
    lg.add_argument("name")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the container stops")
    lg.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    lg.add_argument("--since", metavar="DURATION|TIME", help="only output since then: 10m, or an ISO 8601 time")
    engine_timeout(lg, "output starts")

    for verb, helptext, every in (
        ("stop", "stop sandboxes, keeping their workspaces", "stop every Ready or Paused sandbox"),
        ("start", "start sandboxes again", "start every Stopped sandbox and every one in Error"),
        ("pause", "freeze sandboxes: memory kept, CPU freed", "pause every Ready sandbox"),
        ("resume", "thaw paused sandboxes where they were", "resume every Paused sandbox"),
        (
            "archive",
            "move stopped sandboxes' workspaces into the object store (start restores them)",
            "archive every Stopped sandbox",
        ),
        (
            "delete",
            "delete sandboxes and their workspaces",
            "delete every sandbox, whatever its phase, DESTROYING ALL THEIR WORKSPACES (asks first unless --yes)",
        ),
    ):
        sp = sub.add_parser(verb, help=helptext)
        sp.add_argument("names", nargs="*", metavar="NAME")
        sp.add_argument("--all", action="store_true", help=every)
        sp.add_argument("--host", default="", metavar="NAME", help="with --all or --selector: those on this host only")
        sp.add_argument(
            "--selector",
            "-l",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="every sandbox with this label (repeatable: all must match), in one command fanned out by the server",
        )
        if verb == "delete":
            sp.add_argument(
                "-y", "--yes", action="store_true", help="do not ask before delete --all (a script must say it)"
            )
        if verb == "stop":
            sp.add_argument(
                "--grace", type=float, default=10.0, help=f"seconds before SIGKILL, 0 to {GRACE_MAX:g} (default 10)"
            )
            sp.add_argument("--reason", default="", help="why, recorded in the log (history shows it)")
        if_seq(sp)
        waiting(sp)

    for verb in ("get", "history"):
        sp = sub.add_parser(verb)
        sp.add_argument("name")
        sp.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    ls = sub.add_parser("list", help="the sandboxes, by name (read page by page, however many there are)")
    ls.add_argument(
        "-o", "--output", choices=("table", "json", "yaml", "name"), default="table", help="name: one name a line"
    )
    ls.add_argument(
        "--phase", action="append", default=[], help=f"only sandboxes in this phase (repeatable): {PHASE_CHOICES}"
    )
    ls.add_argument(
        "--selector",
        "--label",
        "-l",
        dest="label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only sandboxes with this label (repeatable: all must match)",
    )
    ls.add_argument("--all", action="store_true", help="include deleted sandboxes")
    ls.add_argument("--host", default="", metavar="NAME", help="only sandboxes placed on this host")

    hs = sub.add_parser("hosts", help="the hosts driver workers announced: engines, capacity, sandboxes, state")
    hs.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    ho = sub.add_parser("host", help="drain a host or undrain it; add or remove the users of a host's workers")
    hsub = ho.add_subparsers(dest="host_cmd", required=True)
    for verb, text in (("drain", "place no new sandbox on it"), ("undrain", "place sandboxes on it again")):
        hsub.add_parser(verb, help=text).add_argument("host_name", metavar="NAME")
    hadd = hsub.add_parser(
        "add", help="make NATS users for the driver workers of another machine (with authentication)"
    )
    hadd.add_argument("host_name", metavar="NAME", help="the host's name (its SANDBOXCTL_HOST)")
    hadd.add_argument(
        "--engine", action="append", choices=auth.DRIVERS, help="an engine it runs (repeatable; default: every one)"
    )
    hadd.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="where to write its credentials, for that machine (default: <auth>/hosts/NAME)",
    )
    hsub.add_parser("remove", help="remove the users of a host's workers").add_argument("host_name", metavar="NAME")

    ev = sub.add_parser("events", help="print the log, one line per event")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing as the log grows")
    ev.add_argument("-o", "--output", choices=("text", "json"), default="text")
    ev.add_argument("--sandbox", help="only this sandbox's events")
    ev.add_argument("--type", action="append", default=[], help="e.g. stopped, sandbox.failed, or a full type")
    ev.add_argument("--actor", action="append", default=[])
    ev.add_argument("--since", help="TIME (ISO 8601) or log SEQ")

    us = sub.add_parser("user", help="manage the users of the embedded nats-server (docs/security.md)")
    usub = us.add_subparsers(dest="user_cmd", required=True)
    ua = usub.add_parser("add", help="add a user (or change its roles) and reload the running server")
    ua.add_argument("name")
    ua.add_argument(
        "--role", action="append", required=True, choices=auth.ROLES, help="sandbox:read, sandbox:write or admin"
    )
    usub.add_parser("list", help="the users and their roles")
    ur = usub.add_parser("remove", help="remove a user and its credential file, and reload the running server")
    ur.add_argument("name")

    comp = sub.add_parser(
        "completion",
        help="print the shell completion script: verbs, flags and sandbox names "
        '(bash: eval "$(sandboxctl completion bash)"; fish: sandboxctl completion fish | source)',
    )
    comp.add_argument("shell", choices=("bash", "zsh", "fish"))

    wh = sub.add_parser("webhook", help="POST the log's events to URLs, as signed CloudEvents (admin)")
    whsub = wh.add_subparsers(dest="webhook_cmd", required=True)
    wa = whsub.add_parser(
        "add",
        help="a URL that gets the events from now on",
        usage="sandboxctl webhook add URL --secret-file F [--type stopped,failed]",
    )
    wa.add_argument("url", metavar="URL")
    wa.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="TYPE[,TYPE]",
        help="only these events, as events --type takes them (stopped, failed, sandbox.ready...); default all",
    )
    wa.add_argument(
        "--secret-file",
        required=True,
        type=Path,
        metavar="FILE",
        help="the secret each request is signed with (HMAC-SHA256 of the body, header X-Sandboxctl-Signature-256)",
    )
    wl = whsub.add_parser("list", help="the webhooks (never their secrets)")
    wl.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    whsub.add_parser("remove", help="stop POSTing to a webhook").add_argument("id", metavar="ID")

    dl = sub.add_parser("deadletters", help="messages a consumer gave up on, oldest first")
    dl.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    top = sub.add_parser("top", help="a live summary: sandboxes per phase, commands/s, errors")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between screens (default 1)")
    top.add_argument("--once", action="store_true", help="print one summary and exit")

    audit = sub.add_parser("audit", help="answers from the log itself: history, state, replay, verify, export")
    asub = audit.add_subparsers(dest="audit_cmd", required=True)
    ah = asub.add_parser("history", help="every event of one sandbox, deleted ones too")
    ah.add_argument("name")
    ah.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    ast = asub.add_parser("state", help="a sandbox as it stood at a moment")
    ast.add_argument("name")
    ast.add_argument("--as-of", required=True, metavar="TIME|SEQ")
    ast.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="json")
    ar = asub.add_parser("replay", help="rebuild the projection from the log and compare it with the live one")
    ar.add_argument("--until", metavar="TIME|SEQ")
    ar.add_argument("--output", type=Path, help="keep the rebuilt projection at this path")
    asub.add_parser("verify", help="check the log's invariants")
    ad = asub.add_parser("denied", help="refused commands, from the audit stream (admin)")
    ad.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    ax = asub.add_parser("export", help="stream the log as JSON lines")
    ax.add_argument("--format", choices=("jsonl",), default="jsonl")
    ax.add_argument("--sandbox")
    ax.add_argument("--type", action="append", default=[])
    ax.add_argument("--since", metavar="TIME|SEQ")
    ax.add_argument("--until", metavar="TIME|SEQ")
    ax.add_argument("--output", type=Path, help="a file (default: standard output)")


async def _confirm_delete_all(names: list[str]) -> None:
    """Deleting everything destroys every workspace: a person confirms it on a terminal, a script
    says --yes. Raises unless confirmed."""
    count = f"{len(names)} sandbox{'es' if len(names) != 1 else ''}"
    if not sys.stdin.isatty():
        raise Failure(
            ErrorCode.INVALID_ARGUMENT,
            f"delete --all would delete {count} and destroy their workspaces; "
            "stdin is not a terminal, so nothing was deleted: say --yes to confirm",
        )
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    print(
        f"delete --all deletes {count} ({shown}) and DESTROYS THEIR WORKSPACES, every file in them; "
        "there is no undo.\nType yes to delete them: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    answer = await asyncio.to_thread(sys.stdin.readline)
    if answer.strip().lower() != "yes":
        raise Failure(ErrorCode.FAILED_PRECONDITION, "not confirmed: nothing was deleted")


PAST = {
    "stop": "stopped",
    "start": "started",
    "pause": "paused",
    "resume": "resumed",
    "archive": "archived",
    "delete": "deleted",
}


async def _wait_shown(client: SandboxClient, verb: str, name: str, seq: int, timeout: float) -> None:
    """Wait for ``name`` to be Ready, its phases shown on a terminal as they move."""
    with Progress(verb, 1) as progress:
        await progress.wait(client, name, Phase.READY, seq, timeout)
        progress.done()


async def _bulk_selected(client: SandboxClient, verb: BulkVerb, args: argparse.Namespace) -> int:
    """--selector and --all: one command, which the state machine fans out; each sandbox's
    result is printed, with progress on a terminal while they get to their phase."""
    if verb == "delete" and not args.yes:
        names = [s["name"] for s in await client.list(labels=args.selector_labels or None, host=args.host)]
        if names:
            await _confirm_delete_all(names)
    items: list[BulkItem] = []
    async for page in client.bulk(
        verb,
        args.selector_labels,
        all=args.all,
        timeout=getattr(args, "grace", 10.0),
        reason=getattr(args, "reason", ""),
        host=args.host,
    ):
        items.extend(page.items)

    async def settle(item: BulkItem) -> str | None:
        try:
            if not item.accepted:
                return f"{item.code}: {item.message}"
            if item.appended and not args.no_wait:
                try:
                    await progress.wait(client, item.name, TERMINAL[verb], item.seq, args.timeout)
                except SandboxError as exc:
                    return f"{exc.code}: {exc.message}"
            return None
        finally:
            progress.done()

    with Progress(verb, 0 if args.no_wait else len(items)) as progress:
        results = await asyncio.gather(*(settle(item) for item in items))
    for item, error in zip(items, results, strict=True):
        if error is not None:
            print(f"sandboxctl: {item.name}: {error}", file=sys.stderr)
        else:
            print(f"{item.name}: {PAST[verb] if not args.no_wait or not item.appended else 'accepted'}")
    failed = [error for error in results if error is not None]
    done = len(items) - len(failed)
    if done:
        print(f"{done} sandbox{'es' if done != 1 else ''} {PAST[verb] if not args.no_wait else 'accepted'}")
    if not items:
        print(f"no sandbox to {verb}")
    return EXIT_CODES.get(failed[0].split(":", 1)[0], 1) if failed else 0


async def _bulk(client: SandboxClient, verb: BulkVerb, args: argparse.Namespace) -> int:
    if args.all or args.selector_labels:
        return await _bulk_selected(client, verb, args)
    names = list(args.names)  # names, or --all / --selector: never both (see _check)

    async def one(name: str) -> str | None:
        try:
            seq = args.expected_seq
            if verb == "stop":
                reply = await client.stop(name, timeout=args.grace, reason=args.reason, expected_seq=seq)
            elif verb == "start":
                reply = await client.start(name, expected_seq=seq)
            elif verb == "pause":
                reply = await client.pause(name, expected_seq=seq)
            elif verb == "resume":
                reply = await client.resume(name, expected_seq=seq)
            elif verb == "archive":
                reply = await client.archive(name, expected_seq=seq)
            else:
                reply = await client.delete(name, expected_seq=seq)
            if not args.no_wait:
                await progress.wait(client, name, TERMINAL[verb], reply.seq, args.timeout)
            return None
        except SandboxError as exc:
            return f"{exc.code}: {exc.message}"
        finally:
            progress.done()

    with Progress(verb, 0 if args.no_wait else len(names)) as progress:
        results = await asyncio.gather(*(one(n) for n in names))
    failed = [(n, r) for n, r in zip(names, results, strict=True) if r is not None]
    for _, reason in failed:
        print(f"sandboxctl: {reason}", file=sys.stderr)
    done = len(names) - len(failed)
    if names and done:
        print(f"{done} sandbox{'es' if done != 1 else ''} {PAST[verb] if not args.no_wait else 'accepted'}")
    if failed:
        return EXIT_CODES.get(failed[0][1].split(":", 1)[0], 1)
    if not names:
        print(f"no sandbox to {verb}")
    return 0


def _secret(path: Path) -> str:
    """The secret in ``path``, without its trailing newline; bounded, and text."""
    from sandboxctl.events.webhooks import SECRET_MAX

    try:
        with path.open("rb") as f:
            data = f.read(SECRET_MAX + 2)
    except OSError as exc:
        raise Failure(ErrorCode.INVALID_ARGUMENT, f"--secret-file {path}: {exc.strerror or exc}") from None
    try:
        return data.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise Failure(ErrorCode.INVALID_ARGUMENT, f"--secret-file {path}: not UTF-8 text") from None


async def _webhook(client: SandboxClient, args: argparse.Namespace) -> int:
    if args.webhook_cmd == "add":
        types = [t for item in args.type for t in item.split(",")]
        row = await client.add_webhook(args.url, types, _secret(args.secret_file))
        print(f"webhook {row['id']} added: {row['url']} gets {row['types']} events after log seq {row['after_seq']}")
    elif args.webhook_cmd == "list":
        show(await client.webhooks(), args.output, ("id", "url", "types", "after_seq", "created_at", "created_by"))
    else:
        await client.remove_webhook(args.id)
        print(f"webhook {args.id} removed")
    return 0


def _event_line(seq: int, env: Any) -> str:
    data = msgspec.to_builtins(env.data)
    detail = " ".join(f"{k}={v}" for k, v in data.items() if k not in ("sandbox_id",) and v not in (None, "", {}))
    short = short_type(env.type)
    return f"{seq:>8} {env.time.isoformat(timespec='milliseconds')} {env.subject:<20} {short:<28} {detail}".rstrip()


def _point(text: str | None) -> Point | None:
    if text is None:
        return None
    from sandboxctl import audit

    try:
        return audit.parse_point(text)
    except ValueError as exc:
        raise Failure("invalid_argument", str(exc)) from None


async def _events(client: SandboxClient, args: argparse.Namespace) -> int:
    from sandboxctl import audit

    since = _point(args.since)
    start = since if isinstance(since, int) else 1
    async for seq, envelope in client.events(args.sandbox, start, follow=args.follow):
        if not audit.selected(seq, envelope, args.type, args.actor, since):
            continue
        if args.output == "json":
            print(audit.jsonl(seq, envelope).decode(), flush=True)
        else:
            print(_event_line(seq, envelope), flush=True)
    return 0


async def _top(client: SandboxClient, args: argparse.Namespace) -> int:
    commands = 0

    async def count(_msg: Any) -> None:
        nonlocal commands
        commands += 1

    sub = await client.nc.subscribe(subjects.COMMANDS_ALL, cb=count)
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        while True:
            await asyncio.sleep(args.interval)
            # One bounded reply (counts per phase, the latest in Error) however many sandboxes there are.
            summary = await client.summary()
            now_ = loop.time()
            rate, commands, began = commands / max(now_ - began, 1e-9), 0, now_
            live = [p for p in Phase if p is not Phase.DELETED]
            phases = {p: int(summary["phases"].get(p.value, 0)) for p in live}
            lines = [
                f"sandboxctl top  {sum(phases.values())} sandboxes  {rate:.1f} commands/s",
                "",
                "  ".join(f"{phase}: {count}" for phase, count in phases.items()),
                "",
            ]
            errors, in_error = summary["errors"], phases[Phase.ERROR]
            lines.append(f"in Error ({in_error}):" if in_error else "nothing in Error")
            lines += [f"  {i['name']:<24} {i['last_error']}" for i in errors]
            if in_error > len(errors):
                lines.append(f"  ... and {in_error - len(errors)} more: sandboxctl list --phase Error")
            screen = "\n".join(lines)
            if args.once:
                print(screen)
                return 0
            print("\x1b[H\x1b[2J" + screen, flush=True)
    finally:
        await sub.unsubscribe()


async def _admin_only(client: SandboxClient, what: str) -> None:
    """replay and verify are operators' tools: only a user who may read the audit stream (admin) runs them."""
    try:
        await client.may_read(subjects.AUDIT_STREAM)
    except PermissionDenied:
        raise PermissionDenied(f"audit {what} needs the admin role; user {client.user} does not have it") from None


async def _audit(client: SandboxClient, args: argparse.Namespace, config: Config) -> int:
    from sandboxctl import audit
    from sandboxctl.bus import reading

    js = client.nc.jetstream()
    if args.audit_cmd in ("replay", "verify", "denied"):
        await _admin_only(client, args.audit_cmd)
    else:
        await client.may_read(subjects.LOG_STREAM)
    if args.audit_cmd == "denied":
        items = await client.denied_attempts()
        show(items, args.output, ("time", "user", "action", "sandbox", "required", "reason"))
        return 0
    if args.audit_cmd == "history":
        items = await reading.history(js, args.name)
        if not items:
            raise Failure("not_found", f"sandbox {args.name} has no events in the log")
        show(items, args.output, ("seq", "time", "type", "phase", "actor", "correlationid", "causationid"))
        return 0
    if args.audit_cmd == "state":
        point = _point(args.as_of)
        assert point is not None
        state = await audit.state_as_of(js, args.name, point)
        if state is None:
            raise Failure("not_found", f"sandbox {args.name} did not exist at {args.as_of}")
        show(msgspec.to_builtins(state), args.output, ("name", "phase", "since", "seq", "driver", "last_error"))
        return 0
    if args.audit_cmd == "replay":
        if not config.projection_path.exists():
            raise Failure("not_found", f"no live projection at {config.projection_path}")
        report = await audit.replay(client.nc, config.projection_path, _point(args.until), args.output)
        show(report, "json")
        if report["differences"]:
            raise Failure("failed", f"{len(report['differences'])} rows differ between the log and the projection")
        if report["behind"]:
            raise Failure(
                "failed",
                f"the projection is {report['behind']} events behind the log's head ({report['live_position']} of "
                f"{report['log_head']}) and did not catch up: is the projector running? (sandboxctl status)",
            )
        return 0
    if args.audit_cmd == "verify":
        count, problems = await audit.verify(js)
        for v in problems:
            print(f"{v.seq:>8} {v.sandbox:<24} {v.problem}")
        if problems:
            raise Failure("failed", f"{len(problems)} violations in {count} events")
        print(f"{count} events, no violations")
        return 0
    out = args.output.open("wb") if args.output else None
    try:
        write = out.write if out else sys.stdout.buffer.write
        count = await audit.export(js, write, args.sandbox, args.type, _point(args.since), _point(args.until))
    finally:
        if out:
            out.close()
        else:
            sys.stdout.flush()
    if out:
        print(f"exported {count} events to {args.output}", file=sys.stderr)
    return 0


async def _idle(client: SandboxClient, args: argparse.Namespace, config: Config) -> int:
    """touch, lease and hold: each appends (at most) an event and prints what it did."""
    holder = getattr(args, "holder", "") or config.actor
    seq = args.expected_seq
    if args.cmd == "touch":
        await client.touch(args.name, expected_seq=seq)
        print(f"sandbox {args.name} touched")
    elif args.cmd == "hold":
        await client.hold(args.name, holder, args.reason, expected_seq=seq)
        print(f"sandbox {args.name} is on hold by {holder}: it cannot start until released")
    elif args.cmd == "unhold":
        await client.unhold(args.name, holder, expected_seq=seq)
        print(f"stop hold of {holder} on {args.name} released")
    elif args.lease_cmd == "release":
        await client.release_lease(args.name, holder, expected_seq=seq)
        print(f"lease of {holder} on {args.name} released")
    else:
        ttl = args.ttl_seconds
        if args.lease_cmd == "acquire":
            await client.acquire_lease(args.name, holder, ttl, expected_seq=seq)
        else:
            await client.renew_lease(args.name, holder, ttl, expected_seq=seq)
        print(f"{holder} holds a lease on {args.name} for {args.ttl}")
    return 0


async def _attach(client: SandboxClient, args: argparse.Namespace, config: Config, command: list[str]) -> int:
    """exec, shell and logs. A closed output pipe (``| head``) ends the command (run_main exits 141
    with one line); a signal ends it and exits 128 + the signal; piped standard input reaches
    ``exec``'s command (a terminal does not: like ``docker exec`` without ``-i``)."""
    from sandboxctl.cli import attach

    wait = args.engine_timeout
    try:
        if args.cmd == "logs":
            try:
                since = attach.since_time(args.since) if args.since else None
            except ValueError as exc:
                raise Failure("invalid_argument", str(exc)) from None
            await attach.show_logs(client, config, args.name, args.tail, since, args.follow, answer_timeout=wait)
            return 0
        if args.cmd == "shell":
            command = command or [args.shell]
            tty = sys.stdin.isatty() and sys.stdout.isatty()
            return await attach.exec_in(
                client,
                config,
                args.name,
                command,
                not args.no_start,
                args.timeout,
                interactive=True,
                tty=tty,
                answer_timeout=wait,
            )
        if not command:
            raise Failure("invalid_argument", "exec needs a command: sandboxctl exec NAME -- CMD...")
        piped = None if args.no_stdin else attach.piped_stdin()
        try:
            return await attach.exec_in(
                client, config, args.name, command, not args.no_start, args.timeout, stdin=piped, answer_timeout=wait
            )
        finally:
            if piped is not None:
                piped.close()
    except attach.Interrupted as exc:
        print(f"sandboxctl: interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except BrokenPipeError:
        done = "the command was ended" if args.cmd == "exec" else "stopped reading"
        raise Failure(BROKEN_PIPE, f"the output of {args.cmd} in sandbox {args.name} was closed; {done}") from None


def _host_users(config: Config, args: argparse.Namespace) -> int:
    """``host add|remove``: the users of another machine's driver workers, in the auth directory
    (the server is told to reload them, as for ``user add``)."""
    store = auth.AuthStore(config.auth_path)
    if not store.users_path.exists():
        raise Failure(ErrorCode.FAILED_PRECONDITION, f"no users at {store.users_path}; run sandboxctl up first")
    if args.host_cmd == "remove":
        try:
            paths = store.remove_host(args.host_name)
        except KeyError:
            raise Failure(
                ErrorCode.NOT_FOUND, f"no users of host {args.host_name[:80]!r} in {store.users_path}"
            ) from None
        print(f"host {args.host_name}'s workers' users removed; their credentials are deleted")
    else:
        try:
            where, paths = store.add_host(args.host_name, args.engine or auth.DRIVERS, args.output)
        except ValueError as exc:
            raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        print(f"host {args.host_name}: {', '.join(p.stem for p in paths)}; its credentials alone are in {where}")
        print(
            f"  on {args.host_name}: SANDBOXCTL_AUTH_DIR={where} SANDBOXCTL_HOST={args.host_name} "
            "sandboxctl serve --only worker"
        )
    if not store.reload_server():
        print("no running embedded nats-server found: the change takes effect when it next starts", file=sys.stderr)
    return 0


def _user(config: Config, args: argparse.Namespace) -> int:
    """Users live in the auth directory; the embedded server is told to reload them (SIGHUP)."""
    store = auth.AuthStore(config.auth_path)
    if args.user_cmd == "list":
        users = [
            {"name": u.name, "roles": ", ".join(u.roles) if not u.component else f"{u.component} on host {u.host}"}
            for u in store.load().values()
            if not u.component or auth.is_host_worker(u)
        ]
        show(users, "table", ("name", "roles"))
        return 0
    if not store.users_path.exists():
        raise Failure(ErrorCode.FAILED_PRECONDITION, f"no users at {store.users_path}; run sandboxctl up first")
    if args.user_cmd == "remove":
        try:
            path = store.remove(args.name)
        except ValueError as exc:
            raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        except KeyError:
            raise Failure(ErrorCode.NOT_FOUND, f"no user {args.name[:80]!r} in {store.users_path}") from None
        reloaded = store.reload_server()
        print(f"user {args.name} removed; its credentials ({path}) are deleted")
        if not reloaded:
            print("no running embedded nats-server found: the user is refused when it next starts", file=sys.stderr)
        return 0
    try:
        path = store.add(args.name, args.role)
    except ValueError as exc:
        raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
    reloaded = store.reload_server()
    print(f"user {args.name} has {', '.join(args.role)}; credentials in {path}")
    print(f"  export SANDBOXCTL_CREDENTIALS={path}")
    if not reloaded:
        print("no running embedded nats-server found: the user is admitted when it next starts", file=sys.stderr)
    return 0


def _fork_server() -> Callable[[Path], Any] | None:
    """What up and serve run for the command line's calls on this host (cli/fast.py), unless
    SANDBOXCTL_FAST=0."""
    if os.environ.get(FAST_ENV, "").strip() == "0":
        return None
    from sandboxctl.cli.forkserver import ForkServer

    return ForkServer


async def run(argv: Sequence[str], config: Config | None = None) -> int:
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = build_parser(argv[0] if argv and not argv[0].startswith("-") else None).parse_args(argv)
    _check(args)
    if args.cmd == "completion":  # needs no settings and no server: it works before anything is set up
        from sandboxctl.cli.completion import script

        print(script(args.shell, build_parser()), end="")
        return 0
    if config is None:
        try:
            config = Config.from_env()
        except ValueError as exc:  # a setting in the environment that is not one
            raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
    if args.cmd in ("up", "serve") and args.metrics is not None:
        try:
            parse_address(args.metrics)
        except ValueError as exc:
            raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        config.metrics = args.metrics
    if args.cmd in ("up", "serve") and args.console is not None:
        try:
            parse_address(args.console, CONSOLE_WHAT)
        except ValueError as exc:
            raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        config.console = args.console
    elif args.cmd == "serve" and config.console == CONSOLE_DEFAULT and not os.environ.get(CONSOLE_ENV, "").strip():
        config.console = CONSOLE_SERVE_DEFAULT  # up's default, which serve leaves to up
    if args.cmd == "up":
        from sandboxctl.cli.console import Console  # Starlette and uvicorn: only where the console is served
        from sandboxctl.runtime.embedded import run_up

        await run_up(
            config,
            port=args.port,
            sync_always=args.sync_always,
            cluster=args.cluster,
            console=Console,
            fork_server=_fork_server(),
        )
        return 0
    if args.cmd == "user":
        return _user(config, args)
    if args.cmd == "host" and args.host_cmd in ("add", "remove"):
        return _host_users(config, args)
    if args.cmd == "serve":
        from sandboxctl.runtime.embedded import COMPONENTS, run_serve

        only = tuple(c.strip() for c in args.only.split(",") if c.strip()) or COMPONENTS
        unknown = sorted(set(only) - set(COMPONENTS))
        if unknown:
            raise Failure("invalid_argument", f"unknown component {', '.join(unknown)}; known: {', '.join(COMPONENTS)}")
        from sandboxctl.cli.console import Console

        await run_serve(config, components=only, console=Console, fork_server=_fork_server())
        return 0
    # With OTEL_EXPORTER_OTLP_ENDPOINT set, the call is the root of its trace (observe.tracing);
    # otherwise nothing of OpenTelemetry is imported.
    export = tracing.setup("sandboxctl-cli", TRACE_EXPORT_WAIT, quiet=True)
    try:
        with tracing.sending(f"sandboxctl {args.cmd}"):
            return await _call(args, config, command)
    finally:
        if export is not None:
            await asyncio.to_thread(export)  # sends what is left before the process ends


async def _call(args: argparse.Namespace, config: Config, command: list[str]) -> int:
    """One verb that talks to the services, as a client."""
    # A follower rides out a server restart; a one-shot command reports it at once.
    patient = args.cmd == "top" or (args.cmd == "events" and args.follow)
    client = await SandboxClient.connect(
        config.nats_url,
        actor=config.actor,
        user=config.user,
        password=config.password,
        **({"max_reconnect_attempts": -1} if patient else {}),
    )
    try:
        if args.cmd == "status":
            from sandboxctl.cli.status import status

            return await status(client, args.output, args.wait)
        if args.cmd == "create":
            reply = await client.create(
                args.name,
                args.image,
                command or None,
                args.labels,
                driver=args.driver,
                idle_timeout=args.idle_timeout_seconds,
                auto_delete_after=args.auto_delete_seconds,
                auto_archive_after=args.auto_archive_seconds,
                resources=args.resources,
                env=args.env,
                expected_seq=args.expected_seq,
                idle_action=args.idle_action,
                host=args.host,
                constraints=args.constraints,
            )
            if not args.no_wait:
                await _wait_shown(client, "create", args.name, reply.seq, args.timeout)
            print(f"sandbox {args.name} {'created' if not args.no_wait else 'accepted'}")
            return 0
        if args.cmd == "clone":
            source = await client.get(args.source)
            reply = await client.clone(
                args.source,
                args.name,
                image=args.image,
                command=command or None,
                labels=args.labels,
                env=args.env,
                resources=args.resources,
                idle_timeout=args.idle_timeout_seconds,
                idle_action=args.idle_action,
                expected_seq=args.expected_seq,
            )
            if source["phase"] == Phase.READY:
                print(f"sandbox {args.source} is Ready: it is paused for the copy and resumed", file=sys.stderr)
            if not args.no_wait:
                await _wait_shown(client, "clone", args.name, reply.seq, args.timeout)
            print(f"sandbox {args.name} {'cloned from ' + args.source if not args.no_wait else 'accepted'}")
            return 0
        if args.cmd == "update":
            reply = await client.update(
                args.name,
                resources=args.resources,
                labels=args.labels,
                remove_labels=args.remove_labels,
                idle_timeout=args.idle_timeout_seconds,
                idle_action=args.idle_action,
                expected_seq=args.expected_seq,
            )
            if reply.appended:
                # Said done once the projection shows it too: a `get` or `list` that follows, in
                # another process, reads it (the client asks for at least the update's seq).
                await client.get(args.name)
            print(f"sandbox {args.name} {'updated' if reply.appended else 'unchanged'} (log seq {reply.seq})")
            return 0
        if args.cmd in BULK_VERBS:
            return await _bulk(client, args.cmd, args)
        if args.cmd in ("touch", "lease", "hold", "unhold"):
            return await _idle(client, args, config)
        if args.cmd in ("exec", "shell", "logs"):
            return await _attach(client, args, config, command)
        if args.cmd == "cp":
            from sandboxctl.cli import copy

            try:
                print(await copy.run_copy(client, config, args.source, args.destination, args.engine_timeout))
            except copy.CopyError as exc:
                raise Failure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
            return 0
        if args.cmd == "get":
            show(await client.get(args.name), args.output)
            return 0
        if args.cmd == "list":
            items = await client.list(args.phase, args.labels, include_deleted=args.all, host=args.host)
            if args.output == "name":
                print("\n".join(item["name"] for item in items))
                return 0
            show(items, args.output)
            return 0
        if args.cmd == "host":
            await client.drain(args.host_name, args.host_cmd == "drain")
            print(f"host {args.host_name} {'drained' if args.host_cmd == 'drain' else 'undrained'}")
            return 0
        if args.cmd == "hosts":
            hosts = await client.hosts()
            if args.output == "table":
                hosts = [_host_row(h) for h in hosts]
            show(hosts, args.output, HOST_COLUMNS)
            return 0
        if args.cmd == "history":
            items = await client.history(args.name)
            if args.output == "table":
                items = [{**item, "why": why(item.get("data") or {})} for item in items]
            show(items, args.output, ("seq", "time", "type", "phase", "actor", "why", "causationid"))
            return 0
        if args.cmd == "events":
            return await _events(client, args)
        if args.cmd == "webhook":
            return await _webhook(client, args)
        if args.cmd == "deadletters":
            items = await client.dead_letters()
            show(items, args.output, ("stream_seq", "time", "consumer", "subject", "deliveries", "reason"))
            return 0
        if args.cmd == "top":
            return await _top(client, args)
        if args.cmd == "audit":
            return await _audit(client, args, config)
    finally:
        await client.close()
    return 0


async def run_main(argv: Sequence[str], config: Config | None = None) -> int:
    """Run one CLI command and turn any failure into its one line and exit code."""
    try:
        return await run(argv, config)
    except SystemExit as exc:  # argparse has printed the help asked for
        return int(exc.code or 0)
    except (SandboxError, Failure) as exc:
        code_name = str(getattr(exc, "code", ErrorCode.INTERNAL))
        message = getattr(exc, "message", str(exc))
    except BrokenPipeError:  # `sandboxctl list | head`: whoever read the output has gone
        code_name, message = BROKEN_PIPE, "the output was closed before it was all written"
    except OSError as exc:
        code_name, message = ErrorCode.UNAVAILABLE, str(exc)
    if code_name == BROKEN_PIPE:
        # Nothing more may go to that pipe, not even the interpreter's last flush.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print(f"sandboxctl: {code_name}: {message}", file=sys.stderr)
    return EXIT_CODES.get(code_name, 1)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run_to_exit(run_main(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
