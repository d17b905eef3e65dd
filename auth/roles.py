"""Roles and the user model: who a user is, what each role allows, and the services' own users.

Each role includes the ones before it: a writer waits on the projection, so it reads too."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import msgspec

from sandboxctl.events import subjects
from sandboxctl.events.commands import COMMAND_TYPES, BulkSandboxes
from sandboxctl.events.limits import NAME_MAX, NAME_PATTERN

READ = "sandbox:read"
WRITE = "sandbox:write"
ADMIN = "admin"
# Each role includes the ones before it: a writer waits on the projection, so it reads too.
ROLES = (READ, WRITE, ADMIN)
# Every command needs sandbox:write (the reaper's user has it): the verbs are the contract's own.
VERB_ROLE = {**{cls.VERB: WRITE for cls in COMMAND_TYPES}, BulkSandboxes.VERB: WRITE}

# The services' own users: one per component and one per engine's driver worker.
COMPONENT_PREFIX = "sandboxctl-"
DRIVERS = ("podman", "docker", "vm")
SERVICE_COMPONENTS = (
    "statemachine",
    "projector",
    "query",
    "reaper",
    "webhooks",
    "console",
    *(f"driver-{d}" for d in DRIVERS),
)
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


def host_worker_user(engine: str, host: str) -> str:
    """The NATS user of ``engine``'s driver worker on ``host``, made by ``sandboxctl host add`` for
    a machine other than the one ``up`` provisioned: each host's worker may announce that host
    alone and read its own work orders only."""
    return f"{component_user('driver-' + engine)}-{host}"


class User(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    password: str
    roles: list[str] = []
    component: str = ""  # set for a service's own user
    host: str = ""  # a driver worker's: the host it works for (its consumer and announcement are that host's)


def is_host_worker(user: User) -> bool:
    """Whether ``user`` is a host's own worker user (``host_worker_user``), made by ``host add``."""
    engine = user.component.removeprefix("driver-")
    return user.component.startswith("driver-") and bool(user.host) and user.name == host_worker_user(engine, user.host)


def adopts_unplaced(user: str, component: str) -> bool:
    """Whether the worker ``component`` connecting as ``user`` ("": no authentication) may take
    over the sandboxes placed on no host (bus.hosts.claim_unplaced): the workers ``up`` provisioned
    may, another machine's (``host add``, ``host_worker_user``) may not."""
    return not user or user == component_user(component)


class Users(msgspec.Struct):
    users: list[User] = []


class Credentials(msgspec.Struct):
    user: str
    password: str

    def connect_options(self) -> dict[str, Any]:
        """nats.connect options: who we are, and inboxes under our own prefix."""
        return {"user": self.user, "password": self.password, "inbox_prefix": subjects.inbox_prefix(self.user)}


def local_user_name(env: dict[str, str] | None = None) -> str:
    """The local login as a valid user name, for the admin credential ``sandboxctl up`` makes."""
    env = dict(os.environ if env is None else env)
    login = env.get("USER") or env.get("LOGNAME") or "operator"
    name = re.sub(r"[^A-Za-z0-9_-]", "_", login)[:63].lstrip("_-") or "operator"
    return "operator" if valid_user_name(name) else name
