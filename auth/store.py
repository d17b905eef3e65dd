"""The auth directory: users.json, the generated server.conf, and one credential file per user,
every file written private (0600) and moved into place whole."""

from __future__ import annotations

import os
import re
import secrets
import signal
from collections.abc import Iterable
from pathlib import Path

import msgspec

from sandboxctl.auth.permissions import server_conf
from sandboxctl.auth.roles import (
    ADMIN,
    COMPONENT_PREFIX,
    DRIVERS,
    ROLES,
    SERVICE_COMPONENTS,
    Credentials,
    User,
    Users,
    component_user,
    host_worker_user,
    is_host_worker,
    valid_user_name,
)
from sandboxctl.events.limits import HOST_MAX, HOST_PATTERN

_HOST = re.compile(HOST_PATTERN)


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

    def node_pid_path(self, index: int) -> Path:
        """Where node ``index`` (from 1) of an embedded cluster writes its pid; node 1's is ``pid_path``."""
        return self.pid_path if index == 1 else self.root / f"nats-server-{index}.pid"

    def credentials_path(self, user: str) -> Path:
        return self.root / "credentials" / f"{user}.json"

    @property
    def enabled(self) -> bool:
        """Whether the server admits only users: this directory holds them (the machine that runs
        the server), or holds a host's workers' credentials (``host add``: another machine)."""
        return self.users_path.exists() or any((self.root / "credentials").glob(f"{COMPONENT_PREFIX}driver-*-*.json"))

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

    def provision(self, admin: str, host: str = "") -> None:
        """What ``sandboxctl up`` needs: a user per service and an admin for the local user (existing
        ones kept); the driver workers' users work for ``host``."""
        users = self.load()
        for component in SERVICE_COMPONENTS:
            name = component_user(component)
            on = host if component.startswith("driver-") else ""
            if name not in users:
                users[name] = User(name=name, password=secrets.token_urlsafe(24), component=component, host=on)
            elif users[name].host != on:
                users[name] = msgspec.structs.replace(users[name], host=on)
        if admin not in users:
            users[admin] = User(name=admin, password=secrets.token_urlsafe(24), roles=[ADMIN])
        self._save(users)

    def credentials(self, user: str) -> Credentials:
        return load_credentials(self.credentials_path(user))

    def worker_credentials(self, engine: str, host: str) -> Credentials:
        """The credentials ``engine``'s driver worker on ``host`` connects with: that host's own
        (``host add``), else the ones ``up`` made for its machine's workers."""
        own = self.credentials_path(host_worker_user(engine, host))
        path = own if own.exists() else self.credentials_path(component_user(f"driver-{engine}"))
        try:
            return load_credentials(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no credentials for the {engine} worker of host {host} in {self.root / 'credentials'}: "
                f"run 'sandboxctl host add {host} --engine {engine}' where the users are, and bring its output here"
            ) from None

    def host_dir(self, host: str) -> Path:
        """Where ``add_host`` puts a host's own credentials, for its machine (and nothing else)."""
        return self.root / "hosts" / host

    def add_host(self, host: str, engines: Iterable[str], output: Path | None = None) -> tuple[Path, list[Path]]:
        """Users for the driver workers of ``host``, one per engine, that may announce that host
        alone, read its own work orders and report facts about its own sandboxes only (their
        passwords kept if they exist). Their credentials, and nothing else, are written to
        ``output`` (default ``host_dir``), a directory the host's machine takes as its
        SANDBOXCTL_AUTH_DIR; returns it and the files. ValueError for a host name that is no
        subject token or an engine sandboxctl has no driver for."""
        if not host or not _HOST.fullmatch(host):
            raise ValueError(f"host {host[:80]!r} must be 1-{HOST_MAX} letters, digits, '-' or '_'")
        engines = sorted(set(engines))
        unknown = [e for e in engines if e not in DRIVERS]
        if unknown or not engines:
            raise ValueError(f"unknown engine {(unknown or [''])[0][:40]!r}; engines are {', '.join(DRIVERS)}")
        users = self.load()
        for engine in engines:
            name = host_worker_user(engine, host)
            old = users.get(name)
            password = old.password if old else secrets.token_urlsafe(24)
            users[name] = User(name=name, password=password, component=f"driver-{engine}", host=host)
        self._save(users)
        output = output or self.host_dir(host)
        copies = []
        for engine in engines:
            path = self.credentials_path(host_worker_user(engine, host))
            copies.append(output / "credentials" / path.name)
            _write_private(copies[-1], path.read_bytes())
        return output, copies

    def remove_host(self, host: str) -> list[Path]:
        """Remove the users ``add_host`` made for ``host`` (its workers are refused once the server
        reloads); returns their credential files, deleted. KeyError if there are none."""
        users = self.load()
        names = [n for n, u in users.items() if u.host == host and is_host_worker(u)]
        if not names:
            raise KeyError(host)
        for name in names:
            del users[name]
        self._save(users)
        paths = [self.credentials_path(name) for name in names]
        for path in [*paths, *(self.host_dir(host) / "credentials" / p.name for p in paths)]:
            path.unlink(missing_ok=True)
        return paths

    def reload_server(self) -> bool:
        """Make the running embedded nats-server (every node of an embedded cluster) re-read its
        users (SIGHUP is ``nats-server --signal reload``); whether one was told."""
        told = False
        for path in [self.pid_path, *sorted(self.root.glob("nats-server-*.pid"))]:
            try:
                pid = int(path.read_text().strip())
                if b"nats-server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue  # a stale pid file, and the number now belongs to someone else
                os.kill(pid, signal.SIGHUP)
            except (OSError, ValueError):
                continue
            told = True
        return told
