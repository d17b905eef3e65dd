"""The podman driver: podman's REST API through the podman SDK.

It talks to a ``podman system service`` socket (``sandboxctl up`` starts one of
its own). Containers run with ``--network none``; the workspace is a named
volume that outlives the container, so only ``delete`` ever removes it. The
operations are drivers.base.EngineDriver's; this module supplies podman's
primitives.

The SDK client is made on first use, so ``timeout`` can still be set after the
driver is built (the CLI bounds exec and logs that way).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, cast

from podman import PodmanClient
from podman.api import stream_frames
from podman.errors import APIError, NotFound, PodmanError

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
    untimed,
    volume_name,
)

_ACTIONS = {"start": "start", "died": "die", "pause": "pause", "unpause": "unpause", "remove": "remove"}


class PodmanDriver(EngineDriver):
    name = "podman"
    # Podman 4.3 works through concurrent stops largely one at a time: with 100 in
    # flight the last ones outlive the SDK's read timeout and fail.
    parallelism = 16  # the best raw thread count measured for 100 stops (bench/bulk_stop.py)

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        super().__init__(base_url, timeout)
        self._client: PodmanClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> PodmanClient:
        with self._lock:
            if self._client is None:
                self._client = PodmanClient(base_url=self.base_url, timeout=self.timeout)
            return self._client

    def _call(self, operation: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NotFound as exc:
            raise ContainerMissing(operation, sdk_message(exc)) from exc
        except (PodmanError, APIError, OSError) as exc:
            raise engine_failure(operation, exc, sdk_message(exc)) from exc
        except Exception as exc:  # requests' errors and the like
            raise engine_failure(operation, exc, f"{type(exc).__name__}: {exc}") from exc

    def _ok(self, operation: str, response: Any) -> Any:
        self._call(operation, response.raise_for_status)
        return response

    def ping(self) -> None:
        if not self._call("ping", self.client.ping):
            raise DriverError("ping", f"podman at {self.base_url} did not answer")

    # -- primitives (drivers.base.EngineDriver) -----------------------------------------

    def _inspect(self, operation: str, ref: str) -> dict[str, Any]:
        response = self._call(operation, self.client.api.get, f"/containers/{ref}/json")
        return self._ok(operation, response).json()  # type: ignore[no-any-return]

    def _start(self, container_id: str) -> None:
        self._ok("start", self._call("start", self.client.api.post, f"/containers/{container_id}/start"))

    def _stop(self, container_id: str, grace: int) -> None:
        # The engine's answer comes after the grace: the read timeout is the grace plus the usual one
        # (the SDK's own, 1.5 x grace, fails a stop of grace 1 that podman takes 1.2 s over).
        response = self._call(
            "stop",
            self.client.api.post,
            f"/containers/{container_id}/stop",
            params={"timeout": grace},
            timeout=grace + self.timeout,
        )
        self._ok("stop", response)

    def _kill(self, container_id: str) -> None:
        response = self._call(
            "stop", self.client.api.post, f"/containers/{container_id}/kill", params={"signal": "KILL"}
        )
        self._ok("stop", response)

    def _pause(self, container_id: str) -> None:
        self._ok("pause", self._call("pause", self.client.api.post, f"/containers/{container_id}/pause"))

    def _unpause(self, operation: str, container_id: str) -> None:
        self._ok(operation, self._call(operation, self.client.api.post, f"/containers/{container_id}/unpause"))

    def _remove(self, container_id: str) -> None:
        self._call("delete", self.client.containers.remove, container_id, force=True)

    def _volume_labels(self, operation: str, sandbox: str) -> dict[str, str] | None:
        volume = self._call(operation, self.client.volumes.get, volume_name(sandbox))
        return volume.attrs.get("Labels")  # type: ignore[no-any-return]

    def _make_volume(self, volume: str, labels: dict[str, str]) -> None:
        self._call("create", self.client.volumes.create, volume, labels=labels)

    def _remove_volume(self, volume: str) -> None:
        self._call("delete", self.client.volumes.remove, volume, force=False)

    def _volume_users(self, volume: str) -> list[tuple[str, dict[str, str]]]:
        containers = self._call("delete", self.client.containers.list, all=True, filters={"volume": volume})
        return [((c.attrs.get("Names") or [c.id])[0], c.attrs.get("Labels") or {}) for c in containers]

    def _make_container(self, image: str, settings: dict[str, Any]) -> dict[str, Any]:
        container = self._call("create", self.client.containers.create, image, **settings)
        self._call("create", container.reload)
        return container.attrs  # type: ignore[no-any-return]

    def _api_prefix(self, operation: str) -> str:
        return str(self.client.api.path_prefix)

    def _log_stream(self, container_id: str, tail: int | None, since: float | None, follow: bool) -> Iterator[bytes]:
        params = {"stdout": True, "stderr": True, "follow": follow, "tail": tail}
        if since is not None:
            params["since"] = int(since)
        response = self._call(
            "logs", self.client.api.get, f"/containers/{container_id}/logs", params=params, stream=True
        )
        try:
            self._ok("logs", response)
            untimed(response)  # podman has answered; a followed log may now be silent for long
            yield from cast(Iterator[bytes], stream_frames(response))  # frames without demux are bytes
        finally:
            response.close()

    def _engine_cli(self) -> list[str]:
        return ["podman", "--url", self.base_url]

    # -- listing and events -------------------------------------------------------------

    def list_managed(self) -> list[ContainerInfo]:
        containers = self._call("list", self.client.containers.list, all=True, filters={"label": f"{MANAGED}=true"})
        infos = []
        for c in containers:
            try:
                self._call("list", c.reload)
            except ContainerMissing:
                continue  # removed between the listing and its inspection
            infos.append(container_info(c.attrs))
        return infos

    def events(self, since: float | None = None) -> Iterator[EngineEvent]:
        client = PodmanClient(base_url=self.base_url, timeout=None)
        try:
            options: dict[str, Any] = {}
            if since is not None:
                options["since"] = int(since)
            stream = self._call(
                "events",
                client.events,
                filters={"type": "container", "label": f"{MANAGED}=true"},
                decode=True,
                **options,
            )
            for raw in stream:
                action = _ACTIONS.get(raw.get("Action") or raw.get("status", ""))
                attrs = (raw.get("Actor") or {}).get("Attributes") or {}
                if action is None or not attrs.get(SANDBOX):
                    continue
                code = attrs.get("containerExitCode")
                yield EngineEvent(
                    action=action,
                    sandbox=attrs[SANDBOX],
                    container_id=(raw.get("Actor") or {}).get("ID", raw.get("id", "")),
                    sandbox_id=attrs.get(SANDBOX_ID, ""),
                    exit_code=int(code) if action == "die" and code is not None else None,
                    time_ns=int(raw.get("timeNano") or 0) or int(raw.get("time") or 0) * 10**9,
                )
        finally:
            client.close()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()  # type: ignore[no-untyped-call]
