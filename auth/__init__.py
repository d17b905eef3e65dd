"""Users, roles and NATS permissions: who may do what, enforced where it can be.

Two layers, so that neither has to trust the other's clients:

- **nats-server** authenticates every connection (user and password) and
  enforces subject permissions generated here: a client cannot publish facts,
  append to the log, call a stream-modifying ``$JS.API`` subject or read a
  stream its role does not allow. Each user may publish commands only on
  subjects ending in its own name (``sandboxctl.cmd.<verb>.<user>``), so that
  token *is* the authenticated actor, and no one can speak for someone else.
- **the state machine** reads the roles from ``users.json`` and refuses a
  command whose user lacks the role with ``permission_denied``; the refusal is
  recorded in the audit stream, never in the log.

Everything lives in one directory (``AuthStore``): ``users.json`` (names,
passwords, roles), ``server.conf`` (generated users and permissions, included
by nats-server) and ``credentials/<user>.json``, one per user, mode 0600.
See docs/security.md.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from sandboxctl.bus.publish import publish
from sandboxctl.events import subjects
from sandboxctl.events.commands import COMMAND_TYPES
from sandboxctl.events.denied import DeniedAttempt
from sandboxctl.events.limits import NAME_MAX, NAME_PATTERN

READ = "sandbox:read"
WRITE = "sandbox:write"
ADMIN = "admin"
# Each role includes the ones before it: a writer waits on the projection, so it reads too.
ROLES = (READ, WRITE, ADMIN)
# Every command needs sandbox:write (the reaper's user has it): the verbs are the contract's own.
VERB_ROLE = {cls.VERB: WRITE for cls in COMMAND_TYPES}

# The services' own users: one per component and one per engine's driver worker.
COMPONENT_PREFIX = "sandboxctl-"
DRIVERS = ("podman", "docker")
SERVICE_COMPONENTS = ("statemachine", "projector", "query", "reaper", *(f"driver-{d}" for d in DRIVERS))
# Services that send commands, with the role the state machine grants them: the reaper warns
# and stops (or, opted in, deletes) like any writer, on its own command subjects.
COMPONENT_ROLES = {"reaper": [WRITE]}
STATEMACHINE_CONSUMER = "sandboxctl-statemachine"  # services.statemachine.FACTS_CONSUMER

_NAME = re.compile(NAME_PATTERN)  # a user name is a subject token, like a sandbox's


def has_role(roles: Iterable[str], needed: str) -> bool:
    rank = max((ROLES.index(r) for r in roles if r in ROLES), default=-1)
    return rank >= ROLES.index(needed)


def valid_user_name(name: str) -> str:
    """Why ``name`` cannot be a user ("" if it can): it is a subject token, and the services' prefix is reserved."""
    if not _NAME.fullmatch(name):
        return (
            f"user name {name[:80]!r} must be 1-{NAME_MAX} letters, digits, '-' or '_', starting with a letter or digit"
        )
    if name.startswith(COMPONENT_PREFIX):
        return f"user names starting with {COMPONENT_PREFIX!r} are reserved for sandboxctl's services"
    return ""


def component_user(component: str) -> str:
    """The NATS user of a service: ``statemachine``, ``projector``, ``query`` or ``driver-<engine>``."""
    return f"{COMPONENT_PREFIX}{component}"


class User(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    password: str
    roles: list[str] = []
    component: str = ""  # set for a service's own user


class Users(msgspec.Struct):
    users: list[User] = []


class Credentials(msgspec.Struct):
    user: str
    password: str

    def connect_options(self) -> dict[str, Any]:
        """nats.connect options: who we are, and inboxes under our own prefix."""
        return {"user": self.user, "password": self.password, "inbox_prefix": subjects.inbox_prefix(self.user)}


def load_credentials(path: Path) -> Credentials:
    return msgspec.json.decode(path.read_bytes(), type=Credentials)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 (never world-readable, not even for a moment), then moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# -- permissions -------------------------------------------------------------------

API = "$JS.API"


def _stream_reader(stream: str) -> list[str]:
    """What a Tail (an ephemeral ordered push consumer) needs to read ``stream``."""
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}",  # ephemeral only: the server refuses a durable name here
        f"{API}.CONSUMER.DELETE.{stream}.*",  # its own, when it closes (the services' durables are denied)
        f"$JS.FC.{stream}.>",  # flow-control replies
    ]


def _durable(stream: str, consumer: str) -> list[str]:
    """What a service needs to work a durable pull consumer of its own."""
    return [
        f"{API}.CONSUMER.INFO.{stream}.{consumer}",
        f"{API}.CONSUMER.CREATE.{stream}.{consumer}",  # nats-py names the durable,
        f"{API}.CONSUMER.CREATE.{stream}.{consumer}.>",  # with its filter subject appended
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",  # older clients
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _stream_info(*streams: str) -> list[str]:
    return [f"{API}.STREAM.INFO.{s}" for s in streams]


CORE_STREAMS = (subjects.LOG_STREAM, subjects.FACTS_STREAM, subjects.DEADLETTER_STREAM)
# Nobody but their owner may delete the services' durable consumers.
PROTECTED_CONSUMERS = [f"{API}.CONSUMER.DELETE.{subjects.LOG_STREAM}.sandboxctl-driver-{d}" for d in DRIVERS] + [
    f"{API}.CONSUMER.DELETE.{subjects.FACTS_STREAM}.{STATEMACHINE_CONSUMER}"
]


def component_permissions(component: str) -> dict[str, Any]:
    """Least privilege per service: exactly the subjects its code uses (see docs/security.md).

    Every service may hear ``sandboxctl.health``: the process that runs it reports its services'
    health (services/health.py). The answer goes to the asker's inbox, so a service that does
    not answer requests anyway may publish to inboxes (``_INBOX.>``) rather than get
    ``allow_responses``: nats-server lets a response go to whatever reply subject the asker
    named, the log's included, even past a deny rule."""
    inbox = f"{subjects.inbox_prefix(component_user(component))}.>"
    if component == "statemachine":
        streams = (*CORE_STREAMS, subjects.AUDIT_STREAM)
        return {
            "publish": {
                "allow": [
                    *_stream_info(*streams),
                    *(f"{API}.STREAM.CREATE.{s}" for s in streams),  # it creates the streams; no one else may
                    *_stream_reader(subjects.LOG_STREAM),
                    *_durable(subjects.FACTS_STREAM, STATEMACHINE_CONSUMER),
                    subjects.LOG_ALL,
                    f"{subjects.DEADLETTER}.{STATEMACHINE_CONSUMER}.*",
                    subjects.AUDIT_ALL,
                ],
                "deny": PROTECTED_CONSUMERS,
            },
            "subscribe": {"allow": [subjects.COMMANDS_ALL, inbox, subjects.HEALTH]},
            "allow_responses": True,
        }
    if component == "projector":
        return {
            "publish": {
                "allow": [
                    *_stream_info(*CORE_STREAMS),
                    *_stream_reader(subjects.LOG_STREAM),
                    f"{subjects.PROJECTED}.*",
                    subjects.INBOXES_ALL,
                ],
                "deny": PROTECTED_CONSUMERS,
            },
            "subscribe": {"allow": [inbox, subjects.HEALTH]},
        }
    if component == "reaper":
        return {
            "publish": {
                "allow": [
                    *_stream_info(*CORE_STREAMS),
                    *_stream_reader(subjects.LOG_STREAM),  # it folds the log for its deadlines
                    subjects.command("*", component_user(component)),
                    subjects.INBOXES_ALL,
                ],
                "deny": PROTECTED_CONSUMERS,
            },
            "subscribe": {"allow": [inbox, subjects.HEALTH]},
        }
    if component == "query":
        return {
            # It answers through allow_responses, and reads a sandbox's history from the log.
            "publish": {"allow": _stream_reader(subjects.LOG_STREAM), "deny": PROTECTED_CONSUMERS},
            "subscribe": {"allow": [f"{subjects.QUERY}.*", inbox, subjects.HEALTH]},
            "allow_responses": True,
        }
    if component.startswith("driver-"):
        consumer = f"sandboxctl-{component}"  # services.worker.DriverWorker.consumer
        return {
            "publish": {
                "allow": [
                    *_stream_info(*CORE_STREAMS),
                    *_stream_reader(subjects.LOG_STREAM),  # reconciliation folds the whole log
                    *_durable(subjects.LOG_STREAM, consumer),
                    subjects.FACTS_ALL,
                    f"{subjects.DEADLETTER}.{consumer}.*",
                    subjects.INBOXES_ALL,
                ],
                "deny": PROTECTED_CONSUMERS,
            },
            "subscribe": {"allow": [inbox, subjects.HEALTH]},
        }
    raise ValueError(f"unknown component {component!r}")


def user_permissions(name: str, roles: Iterable[str]) -> dict[str, Any]:
    """A person's (or another service's) permissions: its own command subjects whatever its roles
    (the state machine checks those, and records refusals), and streams by role. A reader may
    also ask every process for its services' health (``sandboxctl status``)."""
    roles = list(roles)
    publish = [subjects.command("*", name)]
    subscribe = [f"{subjects.inbox_prefix(name)}.>"]
    sub_deny: list[str] = []
    if has_role(roles, READ):
        publish += [f"{subjects.QUERY}.*", *_stream_reader(subjects.LOG_STREAM), subjects.HEALTH]
        subscribe += [f"{subjects.PROJECTED}.*"]
    if has_role(roles, ADMIN):
        publish += [*_stream_reader(subjects.DEADLETTER_STREAM), *_stream_reader(subjects.AUDIT_STREAM)]
        # `sandboxctl top` counts commands; joining the state machine's queue group would steal them.
        subscribe += [subjects.COMMANDS_ALL]
        sub_deny += [f"{subjects.COMMANDS_ALL} sandboxctl-statemachine"]
    perms: dict[str, Any] = {
        "publish": {"allow": publish, "deny": PROTECTED_CONSUMERS},
        "subscribe": {"allow": subscribe},
    }
    if sub_deny:
        perms["subscribe"]["deny"] = sub_deny
    return perms


def permissions(user: User) -> dict[str, Any]:
    return component_permissions(user.component) if user.component else user_permissions(user.name, user.roles)


def server_conf(users: Iterable[User]) -> str:
    """The nats-server ``authorization`` block (NATS config accepts JSON values)."""
    entries = [{"user": u.name, "password": u.password, "permissions": permissions(u)} for u in users]
    return "authorization " + msgspec.json.format(msgspec.json.encode({"users": entries}).decode()) + "\n"


# -- the store ---------------------------------------------------------------------------


class AuthStore:
    """The auth directory: users.json, the generated server.conf, and one credential file per user."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def users_path(self) -> Path:
        return self.root / "users.json"

    @property
    def server_conf_path(self) -> Path:
        return self.root / "server.conf"

    @property
    def pid_path(self) -> Path:
        """Where the embedded nats-server writes its pid, so ``user add`` can make it reload."""
        return self.root / "nats-server.pid"

    def credentials_path(self, user: str) -> Path:
        return self.root / "credentials" / f"{user}.json"

    @property
    def enabled(self) -> bool:
        return self.users_path.exists()

    def load(self) -> dict[str, User]:
        if not self.users_path.exists():
            return {}
        return {u.name: u for u in msgspec.json.decode(self.users_path.read_bytes(), type=Users).users}

    def _save(self, users: dict[str, User]) -> None:
        _write_private(self.users_path, msgspec.json.format(msgspec.json.encode(Users(list(users.values())))))
        for user in users.values():
            path = self.credentials_path(user.name)
            creds = msgspec.json.encode(Credentials(user.name, user.password))
            if not path.exists() or path.read_bytes() != creds:
                _write_private(path, creds)
        _write_private(self.server_conf_path, server_conf(users.values()).encode())

    def add(self, name: str, roles: Iterable[str]) -> Path:
        """Add a person (or replace its roles; its password stays); returns its credential file."""
        problem = valid_user_name(name)
        if problem:
            raise ValueError(problem)
        roles = sorted(set(roles), key=ROLES.index)
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
        users = self.load()
        old = users.get(name)
        users[name] = User(name=name, password=old.password if old else secrets.token_urlsafe(24), roles=roles)
        self._save(users)
        return self.credentials_path(name)

    def remove(self, name: str) -> Path:
        """Remove a person: from users.json and server.conf (so a reloaded server refuses it), and its
        credential file; returns that file's path. The services' own users cannot be removed
        (ValueError): the control plane would stop working. KeyError if there is no such user."""
        users = self.load()
        user = users.get(name)
        if user is None:
            raise KeyError(name)
        if user.component or name.startswith(COMPONENT_PREFIX):
            what = user.component or "service"
            raise ValueError(f"user {name} is sandboxctl's own {what} user: it cannot be removed")
        del users[name]
        self._save(users)  # first: once the server reloads, the user is refused whatever becomes of the file
        path = self.credentials_path(name)
        path.unlink(missing_ok=True)
        return path

    def provision(self, admin: str) -> None:
        """What ``sandboxctl up`` needs: a user per service and an admin for the local user (existing ones kept)."""
        users = self.load()
        for component in SERVICE_COMPONENTS:
            name = component_user(component)
            if name not in users:
                users[name] = User(name=name, password=secrets.token_urlsafe(24), component=component)
        if admin not in users:
            users[admin] = User(name=admin, password=secrets.token_urlsafe(24), roles=[ADMIN])
        self._save(users)

    def credentials(self, user: str) -> Credentials:
        return load_credentials(self.credentials_path(user))

    def reload_server(self) -> bool:
        """Make a running embedded nats-server re-read its users (SIGHUP is ``nats-server --signal reload``)."""
        try:
            pid = int(self.pid_path.read_text().strip())
            if b"nats-server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return False  # a stale pid file, and the number now belongs to someone else
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError):
            return False
        return True


def local_user_name(env: dict[str, str] | None = None) -> str:
    """The local login as a valid user name, for the admin credential ``sandboxctl up`` makes."""
    env = dict(os.environ if env is None else env)
    login = env.get("USER") or env.get("LOGNAME") or "operator"
    name = re.sub(r"[^A-Za-z0-9_-]", "_", login)[:63].lstrip("_-") or "operator"
    return "operator" if valid_user_name(name) else name


class Authorizer:
    """The state machine's view of users.json: roles by user, re-read when the file changes."""

    def __init__(self, store: AuthStore) -> None:
        self.store = store
        self._stamp: tuple[int, int] | None = None
        self._roles: dict[str, list[str]] = {}

    def roles(self, user: str) -> list[str] | None:
        """The user's roles, or None for a user that does not exist (or is a service that sends no commands)."""
        try:
            st = self.store.users_path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            users = self.store.load()
            self._roles = {
                u.name: list(u.roles) if not u.component else COMPONENT_ROLES[u.component]
                for u in users.values()
                if not u.component or u.component in COMPONENT_ROLES
            }
            self._stamp = stamp
        return self._roles.get(user)


# -- the audit stream -----------------------------------------------------------------------


def audit_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.AUDIT_STREAM,
        description="sandboxctl denied attempts, for auditors",
        subjects=[subjects.AUDIT_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=365 * 24 * 3600.0,
        num_replicas=replicas,
        deny_delete=True,
        deny_purge=True,
    )


async def ensure_audit_stream(js: JetStreamContext, replicas: int = 1) -> None:
    try:
        await js.stream_info(subjects.AUDIT_STREAM)
    except NotFoundError:
        try:
            await js.add_stream(audit_stream_config(replicas))
        except APIError as exc:
            if exc.err_code != 10058:  # another instance created it first
                raise


def check(authorizer: Authorizer, subject: str, command: Any) -> DeniedAttempt | None:
    """Whether the command on ``subject`` may run: None, or the attempt to record and refuse.

    The user is the subject's fourth token, which only that user can publish
    on (its NATS permissions), so it is authenticated by the server."""
    tokens = subject.split(".")
    user = tokens[3] if len(tokens) == 4 else ""
    needed = VERB_ROLE.get(command.VERB, ADMIN)
    roles = authorizer.roles(user) if user else None
    if not user:
        reason = f"commands must be sent on {subjects.command(command.VERB, '<user>')} with authorization on"
    elif roles is None:
        reason = f"user {user} has no roles"
    elif not has_role(roles, needed):
        reason = f"user {user} may not {command.VERB}: it needs {needed}, and has {', '.join(roles) or 'no role'}"
    else:
        return None
    return DeniedAttempt(
        id=f"{user or '_'}:{command.command_id or secrets.token_hex(8)}",
        time=datetime.now(UTC).isoformat(),
        user=user or "_",
        action=command.VERB,
        sandbox=command.name[:63],
        subject=subject[:200],
        required=needed,
        roles=roles or [],
        reason=reason,
        command_id=command.command_id[:200],
        claimed_actor=command.actor[:200],
    )


async def record_denied(js: JetStreamContext, attempt: DeniedAttempt) -> None:
    """Store the refusal before it is answered, so a caller who saw the reply finds the record."""
    await publish(
        js,
        subjects.denied(attempt.user),
        msgspec.json.encode(attempt),
        subjects.AUDIT_STREAM,
        {"Nats-Msg-Id": attempt.id},
    )
