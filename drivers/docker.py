"""The docker driver: the docker Engine API through the docker SDK.

The same contract as the podman driver, on a docker daemon: containers run with
``network_mode="none"``; the workspace is a named volume that outlives the
container, so only ``delete`` ever removes it. The operations are
drivers.base.EngineDriver's; this module supplies docker's primitives.

The SDK client is made on first use, not in the constructor: the SDK asks the
daemon for its API version while it is being built, and a driver must be
constructible while its daemon is down (an unreachable engine is an error on
each operation, not at startup). Negotiating rather than pinning a version
keeps both old daemons (20.10 speaks 1.41 at most) and new ones (29 refuses
anything below 1.44) working.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import requests
from docker import DockerClient
from docker.errors import DockerException, ImageNotFound, NotFound

from sandboxctl.drivers.base import (
    MANAGED,
    SANDBOX,
    SANDBOX_ID,
    ContainerInfo,
    ContainerMissing,
    DriverError,
    EngineDriver,
    EngineEvent,
    container_info,
    engine_failure,
    sdk_message,
    volume_name,
)

_ACTIONS = {"start": "start", "die": "die", "pause": "pause", "unpause": "unpause", "destroy": "remove"}

# The driver worker runs up to 256 operations at once; the SDK's default pool of
# 10 connections would open and discard a connection for most of them, with a warning each.
_POOL_SIZE = 64


class DockerDriver(EngineDriver):
    name = "docker"
    parallelism = 32  # the best raw thread count measured for 100 stops (bench/bulk_stop.py)

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        super().__init__(base_url, timeout)
        self._client: DockerClient | None = None
        self._lock = threading.Lock()

    def _call(self, operation: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImageNotFound as exc:  # a NotFound to the SDK, but the container is not what is missing
            raise DriverError(operation, sdk_message(exc)) from exc
        except NotFound as exc:
            raise ContainerMissing(operation, sdk_message(exc)) from exc
        except (DockerException, requests.RequestException, OSError) as exc:
            raise engine_failure(operation, exc, sdk_message(exc)) from exc
        except Exception as exc:  # urllib3's errors and the like
            raise engine_failure(operation, exc, f"{type(exc).__name__}: {exc}") from exc

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

    # -- primitives (drivers.base.EngineDriver) -----------------------------------------

    def _inspect(self, operation: str, ref: str) -> dict[str, Any]:
        return self._call(operation, self._docker(operation).api.inspect_container, ref)  # type: ignore[no-any-return]

    def _start(self, container_id: str) -> None:
        self._call("start", self._docker("start").api.start, container_id)

    def _stop(self, container_id: str, grace: int) -> None:
        # The daemon sends SIGTERM, waits out the grace, then kills; the SDK extends its own read
        # timeout by the same amount.
        self._call("stop", self._docker("stop").api.stop, container_id, timeout=grace)

    def _kill(self, container_id: str) -> None:
        self._call("stop", self._docker("stop").api.kill, container_id, "KILL")

    def _pause(self, container_id: str) -> None:
        self._call("pause", self._docker("pause").api.pause, container_id)

    def _unpause(self, operation: str, container_id: str) -> None:
        self._call(operation, self._docker(operation).api.unpause, container_id)

    def _remove(self, container_id: str) -> None:
        self._call("delete", self._docker("delete").api.remove_container, container_id, force=True)

    def _volume_labels(self, operation: str, sandbox: str) -> dict[str, str] | None:
        return self._call(operation, self._docker(operation).api.inspect_volume, volume_name(sandbox)).get("Labels")  # type: ignore[no-any-return]

    def _make_volume(self, volume: str, labels: dict[str, str]) -> None:
        self._call("create", self._docker("create").volumes.create, name=volume, labels=labels)

    def _remove_volume(self, volume: str) -> None:
        # force only makes docker ignore a missing volume; one in use is refused (409) either way.
        self._call("delete", self._docker("delete").api.remove_volume, volume, force=False)

    def _volume_users(self, volume: str) -> list[tuple[str, dict[str, str]]]:
        found = self._call("delete", self._docker("delete").api.containers, all=True, filters={"volume": volume})
        return [((c.get("Names") or [c.get("Id", "")])[0].lstrip("/"), c.get("Labels") or {}) for c in found]

    def _make_container(self, image: str, settings: dict[str, Any]) -> dict[str, Any]:
        container = self._call("create", self._docker("create").containers.create, image, **settings)
        self._call("create", container.reload)
        return container.attrs  # type: ignore[no-any-return]

    def _api_prefix(self, operation: str) -> str:
        return f"/v{self._docker(operation).api.api_version}"

    def _log_stream(self, container_id: str, tail: int | None, since: float | None, follow: bool) -> Iterator[bytes]:
        # With the timed client: the SDK lifts the read timeout itself once the daemon has answered.
        stream = self._call(
            "logs",
            self._docker("logs").api.logs,
            container_id,
            stream=True,
            follow=follow,
            tail="all" if tail is None else tail,
            since=None if since is None else int(since),
        )
        try:
            yield from stream
        finally:
            stream.close()

    def _engine_cli(self) -> list[str]:
        return ["docker", "-H", self.base_url]

    # -- listing and events -------------------------------------------------------------

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
                    time_ns=int(raw.get("timeNano") or 0) or int(raw.get("time") or 0) * 10**9,
                )
        finally:
            client.close()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
