"""The ``sandboxctl`` command line.

Every command exits 0 on success. On a rejection, an error or a timeout it
prints one line, ``sandboxctl: <code>: <reason>``, to stderr and exits with the
code's number from EXIT_CODES, so scripts can branch without parsing text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from events import subjects
from services import attach, audit, auth
from services.client import TERMINAL, PermissionDenied, SandboxClient, SandboxError
from services.config import Config, parse_duration
from statemachine import Phase

EXIT_CODES = {
    "invalid_argument": 2,
    "not_found": 3,
    "already_exists": 4,
    "failed_precondition": 5,
    "conflict": 6,
    "internal": 7,
    "unavailable": 8,
    "timeout": 9,
    "failed": 10,
    "permission_denied": 11,
}

TABLE_COLUMNS = ("name", "phase", "driver", "image", "last_error", "updated_at")


class Failure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _labels(pairs: Sequence[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Failure("invalid_argument", f"label {pair!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _print(data: Any, output: str, columns: Sequence[str] = TABLE_COLUMNS) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, default=str))
    elif output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    else:
        print(_table(data if isinstance(data, list) else [data], columns))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandboxctl", description="Create, stop, start and delete sandboxes.")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run nats-server, podman and every service on embedded defaults")
    up.add_argument("--port", type=int, default=4222, help="NATS port (default 4222)")
    up.add_argument("--sync-always", action="store_true", help="fsync every JetStream write (slower, safer)")

    serve = sub.add_parser("serve", help="run the services against the NATS in SANDBOXCTL_NATS_URL")
    serve.add_argument(
        "--only",
        default="",
        metavar="COMPONENT[,...]",
        help="run only these: statemachine, projector, query, worker, reaper (default: all)",
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
    waiting(c)

    t = sub.add_parser("touch", help="record use of a sandbox: its idle clock starts again")
    t.add_argument("name")

    lease = sub.add_parser("lease", help="keep a sandbox from being auto-stopped while you hold a lease")
    lsub = lease.add_subparsers(dest="lease_cmd", required=True)
    for verb in ("acquire", "renew", "release"):
        sp = lsub.add_parser(verb)
        sp.add_argument("name")
        sp.add_argument("--holder", default="", help="who holds it (default: SANDBOXCTL_ACTOR, else $USER)")
        if verb != "release":
            sp.add_argument("--ttl", default="10m", metavar="DURATION", help="how long it lasts (default 10m)")

    h = sub.add_parser("hold", help="place a stop hold: the sandbox cannot start until it is released")
    h.add_argument("name")
    h.add_argument("--holder", default="", help="who holds it (default: SANDBOXCTL_ACTOR, else $USER)")
    h.add_argument("--reason", default="")
    uh = sub.add_parser("unhold", help="release a stop hold")
    uh.add_argument("name")
    uh.add_argument("--holder", default="")

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

    lg = sub.add_parser("logs", help="the container's output")
    lg.add_argument("name")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the container stops")
    lg.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    lg.add_argument("--since", metavar="DURATION|TIME", help="only output since then: 10m, or an ISO 8601 time")

    for verb, helptext in (
        ("stop", "stop sandboxes, keeping their workspaces"),
        ("start", "start sandboxes again"),
        ("delete", "delete sandboxes and their workspaces"),
    ):
        sp = sub.add_parser(verb, help=helptext)
        sp.add_argument("names", nargs="*")
        sp.add_argument("--all", action="store_true")
        if verb == "stop":
            sp.add_argument("--grace", type=float, default=10.0, help="seconds before SIGKILL (default 10)")
            sp.add_argument("--reason", default="", help="why, recorded in the log (history shows it)")
        waiting(sp)

    for verb in ("get", "history"):
        sp = sub.add_parser(verb)
        sp.add_argument("name")
        sp.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    ls = sub.add_parser("list")
    ls.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    ls.add_argument("--phase", action="append", default=[])
    ls.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    ls.add_argument("--all", action="store_true", help="include deleted sandboxes")

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

    dl = sub.add_parser("deadletters", help="messages a consumer gave up on, oldest first")
    dl.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    top = sub.add_parser("top", help="a live summary: sandboxes per phase, commands/s, errors")
    top.add_argument("--interval", type=float, default=1.0)
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
    return p


async def _bulk(client: SandboxClient, verb: str, args: argparse.Namespace) -> int:
    names = list(args.names)
    if args.all:
        if names:
            raise Failure("invalid_argument", "give names or --all, not both")
        phases = {"stop": ["Ready"], "start": ["Stopped", "Error"], "delete": []}[verb]
        names = [s["name"] for s in await client.list(phases=phases)]
    elif not names:
        raise Failure("invalid_argument", f"{verb} needs at least one NAME, or --all")

    async def one(name: str) -> str | None:
        try:
            if verb == "stop":
                reply = await client.stop(name, timeout=args.grace, reason=args.reason)
            elif verb == "start":
                reply = await client.start(name)
            else:
                reply = await client.delete(name)
            if not args.no_wait:
                await client.wait_for(name, TERMINAL[verb], reply.seq, args.timeout)
            return None
        except SandboxError as exc:
            return f"{exc.code}: {exc.message}"

    results = await asyncio.gather(*(one(n) for n in names))
    failed = [(n, r) for n, r in zip(names, results, strict=True) if r is not None]
    for _, reason in failed:
        print(f"sandboxctl: {reason}", file=sys.stderr)
    done = len(names) - len(failed)
    if names and done:
        past = {"stop": "stopped", "start": "started", "delete": "deleted"}[verb]
        print(f"{done} sandbox{'es' if done != 1 else ''} {past if not args.no_wait else 'accepted'}")
    if failed:
        return EXIT_CODES.get(failed[0][1].split(":", 1)[0], 1)
    return 0


def _why(data: dict[str, Any]) -> str:
    """What a history line shows of an event's data: a stop's reason, a lease's holder, ..."""
    parts = [str(data[k]) for k in ("reason", "via", "holder", "kind", "cause") if data.get(k)]
    if "grace" in data:
        parts.append(f"grace {data['grace']:g}s")
    return " ".join(parts)


def _event_line(seq: int, env: Any) -> str:
    data = msgspec.to_builtins(env.data)
    detail = " ".join(f"{k}={v}" for k, v in data.items() if k not in ("sandbox_id",) and v not in (None, "", {}))
    short = env.type.removeprefix("sandboxctl.").rsplit(".", 1)[0]
    return f"{seq:>8} {env.time.isoformat(timespec='milliseconds')} {env.subject:<20} {short:<28} {detail}".rstrip()


def _point(text: str | None) -> audit.Point | None:
    if text is None:
        return None
    try:
        return audit.parse_point(text)
    except ValueError as exc:
        raise Failure("invalid_argument", str(exc)) from None


async def _events(client: SandboxClient, args: argparse.Namespace) -> int:
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
            items = await client.list(include_deleted=False)
            now_ = loop.time()
            rate, commands, began = commands / max(now_ - began, 1e-9), 0, now_
            phases: dict[str, int] = {}
            for item in items:
                phases[item["phase"]] = phases.get(item["phase"], 0) + 1
            lines = [
                f"sandboxctl top  {len(items)} sandboxes  {rate:.1f} commands/s",
                "",
                "  ".join(
                    f"{phase}: {phases.get(phase, 0)}" for phase in (p.value for p in Phase) if phase != "Deleted"
                ),
                "",
            ]
            errors = [i for i in items if i["phase"] == "Error"]
            lines.append(f"in Error ({len(errors)}):" if errors else "nothing in Error")
            lines += [f"  {i['name']:<24} {i['last_error']}" for i in errors[:50]]
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
    js = client.nc.jetstream()
    if args.audit_cmd in ("replay", "verify", "denied"):
        await _admin_only(client, args.audit_cmd)
    else:
        await client.may_read(subjects.LOG_STREAM)
    if args.audit_cmd == "denied":
        items = await client.denied_attempts()
        _print(items, args.output, ("time", "user", "action", "sandbox", "required", "reason"))
        return 0
    if args.audit_cmd == "history":
        items = await audit.history(js, args.name)
        if not items:
            raise Failure("not_found", f"sandbox {args.name} has no events in the log")
        _print(items, args.output, ("seq", "time", "type", "phase", "actor", "correlationid", "causationid"))
        return 0
    if args.audit_cmd == "state":
        point = _point(args.as_of)
        assert point is not None
        state = await audit.state_as_of(js, args.name, point)
        if state is None:
            raise Failure("not_found", f"sandbox {args.name} did not exist at {args.as_of}")
        _print(msgspec.to_builtins(state), args.output, ("name", "phase", "seq", "driver", "last_error"))
        return 0
    if args.audit_cmd == "replay":
        if not config.projection_path.exists():
            raise Failure("not_found", f"no live projection at {config.projection_path}")
        report = await audit.replay(client.nc, config.projection_path, _point(args.until), args.output)
        _print(report, "json")
        if report["differences"]:
            raise Failure("failed", f"{len(report['differences'])} rows differ between the log and the projection")
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


def _duration(text: str, what: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise Failure("invalid_argument", f"{what}: {exc}") from None


async def _idle(client: SandboxClient, args: argparse.Namespace, config: Config) -> int:
    """touch, lease and hold: each appends (at most) an event and prints what it did."""
    holder = getattr(args, "holder", "") or config.actor
    if args.cmd == "touch":
        await client.touch(args.name)
        print(f"sandbox {args.name} touched")
    elif args.cmd == "hold":
        await client.hold(args.name, holder, args.reason)
        print(f"sandbox {args.name} is on hold by {holder}: it cannot start until released")
    elif args.cmd == "unhold":
        await client.unhold(args.name, holder)
        print(f"stop hold of {holder} on {args.name} released")
    elif args.lease_cmd == "release":
        await client.release_lease(args.name, holder)
        print(f"lease of {holder} on {args.name} released")
    else:
        ttl = _duration(args.ttl, "--ttl")
        if args.lease_cmd == "acquire":
            await client.acquire_lease(args.name, holder, ttl)
        else:
            await client.renew_lease(args.name, holder, ttl)
        print(f"{holder} holds a lease on {args.name} for {args.ttl}")
    return 0


async def _attach(client: SandboxClient, args: argparse.Namespace, config: Config, command: list[str]) -> int:
    if args.cmd == "logs":
        try:
            since = attach.since_time(args.since) if args.since else None
        except ValueError as exc:
            raise Failure("invalid_argument", str(exc)) from None
        await attach.show_logs(client, config, args.name, args.tail, since, args.follow)
        return 0
    if args.cmd == "shell":
        command = command or [args.shell]
        tty = sys.stdin.isatty() and sys.stdout.isatty()
        return await attach.exec_in(
            client, config, args.name, command, not args.no_start, args.timeout, interactive=True, tty=tty
        )
    if not command:
        raise Failure("invalid_argument", "exec needs a command: sandboxctl exec NAME -- CMD...")
    return await attach.exec_in(client, config, args.name, command, not args.no_start, args.timeout)


def _user(config: Config, args: argparse.Namespace) -> int:
    """Users live in the auth directory; the embedded server is told to reload them (SIGHUP)."""
    store = auth.AuthStore(config.auth_path)
    if args.user_cmd == "list":
        users = [{"name": u.name, "roles": ", ".join(u.roles)} for u in store.load().values() if not u.component]
        _print(users, "table", ("name", "roles"))
        return 0
    if not store.enabled:
        raise Failure("failed_precondition", f"no users at {store.users_path}; run sandboxctl up first")
    try:
        path = store.add(args.name, args.role)
    except ValueError as exc:
        raise Failure("invalid_argument", str(exc)) from None
    reloaded = store.reload_server()
    print(f"user {args.name} has {', '.join(args.role)}; credentials in {path}")
    print(f"  export SANDBOXCTL_CREDENTIALS={path}")
    if not reloaded:
        print("no running embedded nats-server found: the user is admitted when it next starts", file=sys.stderr)
    return 0


async def run(argv: Sequence[str], config: Config | None = None) -> int:
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    config = config or Config.from_env()
    if args.cmd == "up":
        from services.embedded import run_up

        await run_up(config, port=args.port, sync_always=args.sync_always)
        return 0
    if args.cmd == "user":
        return _user(config, args)
    if args.cmd == "serve":
        from services.embedded import COMPONENTS, run_serve

        only = tuple(c.strip() for c in args.only.split(",") if c.strip()) or COMPONENTS
        unknown = sorted(set(only) - set(COMPONENTS))
        if unknown:
            raise Failure("invalid_argument", f"unknown component {', '.join(unknown)}; known: {', '.join(COMPONENTS)}")
        await run_serve(config, components=only)
        return 0
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
        if args.cmd == "create":
            reply = await client.create(
                args.name,
                args.image,
                command or None,
                _labels(args.label),
                driver=args.driver,
                idle_timeout=None if args.idle_timeout is None else _duration(args.idle_timeout, "--idle-timeout"),
                auto_delete_after=_duration(args.auto_delete_after, "--auto-delete-after"),
            )
            if not args.no_wait:
                await client.wait_for(args.name, "Ready", reply.seq, args.timeout)
            print(f"sandbox {args.name} {'created' if not args.no_wait else 'accepted'}")
            return 0
        if args.cmd in ("stop", "start", "delete"):
            return await _bulk(client, args.cmd, args)
        if args.cmd in ("touch", "lease", "hold", "unhold"):
            return await _idle(client, args, config)
        if args.cmd in ("exec", "shell", "logs"):
            return await _attach(client, args, config, command)
        if args.cmd == "get":
            _print(await client.get(args.name), args.output)
            return 0
        if args.cmd == "list":
            items = await client.list(args.phase, _labels(args.label), include_deleted=args.all)
            _print(items, args.output)
            return 0
        if args.cmd == "history":
            items = await client.history(args.name)
            if args.output == "table":
                items = [{**item, "why": _why(item.get("data") or {})} for item in items]
            _print(items, args.output, ("seq", "time", "type", "phase", "actor", "why", "causationid"))
            return 0
        if args.cmd == "events":
            return await _events(client, args)
        if args.cmd == "deadletters":
            items = await client.dead_letters()
            _print(items, args.output, ("stream_seq", "time", "consumer", "subject", "deliveries", "reason"))
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
    except SystemExit as exc:  # argparse has printed its usage line
        return int(exc.code or 0)
    except (SandboxError, Failure) as exc:
        code_name = str(getattr(exc, "code", "internal"))
        message = getattr(exc, "message", str(exc))
    except OSError as exc:
        code_name, message = "unavailable", str(exc)
    print(f"sandboxctl: {code_name}: {message}", file=sys.stderr)
    return EXIT_CODES.get(code_name, 1)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = asyncio.run(run_main(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
