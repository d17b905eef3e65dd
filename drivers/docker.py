"""The docker driver: the docker Engine API through the docker SDK.

The same contract as the podman driver, on a docker daemon: containers run with
``network_mode="none"``; the workspace is a named volume that outlives the
container, so only ``delete`` ever removes it.

The SDK client is made on first use, not in the constructor: the SDK asks the
daemon for its API version while it is being built, and a driver must be
constructible while its daemon is down (an unreachable engine is an error on
each operation, not at startup). Negotiating rather than pinning a version
keeps both old daemons (20.10 speaks 1.41 at most) and new ones (29 refuses
anything below 1.44) working.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests
from docker import DockerClient
from docker.errors import DockerException, ImageNotFound, NotFound

from drivers.base import (
    EXEC_SETTLE,
    MANAGED,
    SANDBOX,
    SANDBOX_ID,
    ContainerInfo,
    ContainerMissing,
    DriverError,
    EngineEvent,
    SandboxSpec,
    container_info,
    container_name,
    exec_command,
    foreign_workspace,
    labels_for,
    owned_by,
    volume_name,
)

_ACTIONS = {"start": "start", "die": "die", "destroy": "remove"}

# The driver worker runs up to 256 operations at once; the SDK's default pool of
# 10 connections would open and discard a connection for most of them, with a warning each.
_POOL_SIZE = 64


def _message(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or type(exc).__name__


class DockerDriver:
    name = "docker"
    parallelism = 32  # the best raw thread count measured for 100 stops (bench/bulk_stop.py)

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._client: DockerClient | None = None
        self._lock = threading.Lock()

    def _call(self, operation: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImageNotFound as exc:  # a NotFound to the SDK, but the container is not what is missing
            raise DriverError(operation, _message(exc)) from exc
        except NotFound as exc:
            raise ContainerMissing(operation, _message(exc)) from exc
        except (DockerException, requests.RequestException, OSError) as exc:
            message = _message(exc)
            # A container removed while the daemon resolves its name can answer
            # with a conflict or server error instead of 404; it is just as gone.
            lowered = message.lower()
            if "no such container" in lowered or "no such volume" in lowered:
                raise ContainerMissing(operation, message) from exc
            raise DriverError(operation, message) from exc
        except Exception as exc:  # urllib3's errors and the like
            raise DriverError(operation, f"{type(exc).__name__}: {exc}") from exc

    def _connect(self, operation: str, timeout: float | None, version: str = "auto") -> DockerClient:
        return self._call(  # type: ignore[no-any-return]
            operation,
            DockerClient,
            base_url=self.base_url,
            version=version,
            timeout=timeout,
            max_pool_size=_POOL_SIZE,
        )

    def _docker(self, operation: str) -> DockerClient:
        client = self._client
        if client is not None:
            return client
        # Connect outside the lock, so a daemon that accepts but never answers
        # costs each caller one timeout, not one per caller queued before it.
        client = self._connect(operation, self.timeout)
        with self._lock:
            if self._client is None:
                self._client = client
                return client
            winner = self._client
        client.close()
        return winner

    @property
    def client(self) -> DockerClient:
        return self._docker("connect")

    def ping(self) -> None:
        if not self._call("ping", self._docker("ping").ping):
            raise DriverError("ping", f"docker at {self.base_url} did not answer")

    def _get(self, operation: str, sandbox: str) -> Any:
        return self._call(operation, self._docker(operation).containers.get, container_name(sandbox))

    def _find(self, operation: str, sandbox: str) -> ContainerInfo | None:
        try:
            container = self._get(operation, sandbox)
        except ContainerMissing:
            return None
        return container_info(container.attrs)

    def inspect(self, sandbox: str) -> ContainerInfo | None:
        return self._find("inspect", sandbox)

    def create(self, spec: SandboxSpec) -> ContainerInfo:
        # Looked up as part of "create", so an unreachable daemon fails the create, not an inspect nobody asked for.
        existing = self._find("create", spec.name)
        if existing is not None:
            if existing.sandbox_id != spec.sandbox_id:
                raise DriverError(
                    "create",
                    f"container {container_name(spec.name)} already exists and belongs to sandbox id "
                    f"{existing.sandbox_id or '(none)'}",
                )
            return existing
        client = self._docker("create")
        labels = labels_for(spec.name, spec.sandbox_id, spec.labels)
        volume = volume_name(spec.name)
        try:
            problem = foreign_workspace(volume, self._volume_labels("create", spec.name), spec.sandbox_id)
            if problem is not None:
                raise problem
        except ContainerMissing:
            # Created here rather than left to the container's mount, which
            # would make it too, but without the labels.
            self._call("create", client.volumes.create, name=volume, labels=labels)
        kwargs: dict[str, Any] = {
            "name": container_name(spec.name),
            "labels": labels,
            "volumes": {volume: {"bind": "/workspace", "mode": "rw"}},
            "network_mode": "none",
            "hostname": spec.name,
        }
        if spec.command:
            kwargs["command"] = spec.command
        container = self._call("create", client.containers.create, spec.image, **kwargs)
        self._call("create", container.reload)
        return container_info(container.attrs)

    # Start and stop address the container by name and inspect once after: two engine
    # calls, not three. The daemon answers 304 for a container already in that state.

    def start(self, sandbox: str) -> ContainerInfo:
        api = self._docker("start").api
        self._call("start", api.start, container_name(sandbox))
        return container_info(self._call("start", api.inspect_container, container_name(sandbox)))

    def stop(self, sandbox: str, timeout: float) -> ContainerInfo:
        api = self._docker("stop").api
        # The daemon sends SIGTERM, waits out the timeout, then kills; the SDK
        # extends its own read timeout by the same amount.
        self._call("stop", api.stop, container_name(sandbox), timeout=max(0, round(timeout)))
        return container_info(self._call("stop", api.inspect_container, container_name(sandbox)))

    def delete(self, sandbox: str, sandbox_id: str = "") -> str:
        container_id = ""
        try:
            container = self._get("delete", sandbox)
            if owned_by(container.attrs.get("Config", {}).get("Labels"), sandbox_id):
                container_id = container.id
                self._call("delete", container.remove, force=True)
        except ContainerMissing:
            pass
        try:
            if owned_by(self._volume_labels("delete", sandbox), sandbox_id):
                self._call("delete", self._docker("delete").api.remove_volume, volume_name(sandbox), force=True)
        except ContainerMissing:
            pass
        return container_id

    def _volume_labels(self, operation: str, sandbox: str) -> dict[str, str] | None:
        return self._call(operation, self._docker(operation).api.inspect_volume, volume_name(sandbox)).get("Labels")

    def list_managed(self) -> list[ContainerInfo]:
        containers = self._call(
            "list",
            self._docker("list").containers.list,
            all=True,
            filters={"label": f"{MANAGED}=true"},
            ignore_removed=True,  # one removed between listing and inspecting is simply not listed
        )
        return [container_info(c.attrs) for c in containers]

    def events(self, since: float | None = None) -> Iterator[EngineEvent]:
        # A client of its own without a read timeout: the stream is idle for as
        # long as nothing happens, and the SDK ends it quietly on a socket timeout.
        version = self._docker("events").api.api_version
        client = self._connect("events", None, version)
        try:
            stream = self._call(
                "events",
                client.events,
                # Whole seconds, rounded down: replaying a little more is harmless, missing some is not.
                since=None if since is None else int(since),
                filters={"type": "container", "label": f"{MANAGED}=true", "event": list(_ACTIONS)},
                decode=True,
            )
            for raw in stream:
                action = _ACTIONS.get(raw.get("Action") or raw.get("status", ""))
                actor = raw.get("Actor") or {}
                attrs = actor.get("Attributes") or {}
                if action is None or not attrs.get(SANDBOX):
                    continue
                code = attrs.get("exitCode")
                yield EngineEvent(
                    action=action,
                    sandbox=attrs[SANDBOX],
                    container_id=actor.get("ID", raw.get("id", "")),
                    sandbox_id=attrs.get(SANDBOX_ID, ""),
                    exit_code=int(code) if action == "die" and code is not None else None,
                )
        finally:
            client.close()

    def _streaming(self, operation: str) -> DockerClient:
        """A client without a read timeout: an exec or a followed log may be silent for long."""
        return self._connect(operation, None, self._docker(operation).api.api_version)

    def exec(self, sandbox: str, command: list[str], output: Callable[[int, bytes], None]) -> int:
        client = self._streaming("exec")
        try:
            api = client.api
            exec_id = self._call("exec", api.exec_create, container_name(sandbox), command, stdout=True, stderr=True)
            stream = self._call("exec", api.exec_start, exec_id["Id"], stream=True, demux=True)
            for out, err in stream:
                if out:
                    output(1, out)
                if err:
                    output(2, err)
            deadline = time.monotonic() + EXEC_SETTLE
            while True:
                state = self._call("exec", api.exec_inspect, exec_id["Id"])
                if not state.get("Running") or time.monotonic() > deadline:
                    return int(state.get("ExitCode") or 0)
                time.sleep(0.02)
        finally:
            client.close()

    def logs(
        self, sandbox: str, tail: int | None = None, since: float | None = None, follow: bool = False
    ) -> Iterator[bytes]:
        client = self._streaming("logs")
        try:
            stream = self._call(
                "logs",
                client.api.logs,
                container_name(sandbox),
                stream=True,
                follow=follow,
                tail="all" if tail is None else tail,
                since=None if since is None else int(since),
            )
            yield from stream
        finally:
            client.close()

    def interactive(self, sandbox: str, command: list[str], tty: bool) -> list[str]:
        return exec_command(["docker", "-H", self.base_url], sandbox, command, tty)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
