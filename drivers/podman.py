"""The podman driver: podman's REST API through the podman SDK.

It talks to a ``podman system service`` socket (``sandboxctl up`` starts one of
its own). Containers run with ``--network none``; the workspace is a named
volume that outlives the container, so only ``delete`` ever removes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from podman import PodmanClient
from podman.api import stream_frames
from podman.errors import APIError, NotFound, PodmanError

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

_ACTIONS = {"start": "start", "died": "die", "remove": "remove"}


def _message(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or type(exc).__name__


class PodmanDriver:
    name = "podman"
    # Podman 4.3 works through concurrent stops largely one at a time: with 100 in
    # flight the last ones outlive the SDK's read timeout (1.5 x grace) and fail.
    parallelism = 16  # the best raw thread count measured for 100 stops (bench/bulk_stop.py)

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.client = PodmanClient(base_url=base_url, timeout=timeout)

    def _call(self, operation: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NotFound as exc:
            raise ContainerMissing(operation, _message(exc)) from exc
        except (PodmanError, APIError, OSError) as exc:
            message = _message(exc)
            # A container removed while podman resolves its name answers 500,
            # not 404; it is just as gone.
            if "no such container" in message or "no such volume" in message:
                raise ContainerMissing(operation, message) from exc
            raise DriverError(operation, message) from exc
        except Exception as exc:  # requests' connection errors and the like
            raise DriverError(operation, f"{type(exc).__name__}: {exc}") from exc

    def ping(self) -> None:
        if not self._call("ping", self.client.ping):
            raise DriverError("ping", f"podman at {self.base_url} did not answer")

    def _get(self, operation: str, sandbox: str) -> Any:
        return self._call(operation, self.client.containers.get, container_name(sandbox))

    def _find(self, operation: str, sandbox: str) -> ContainerInfo | None:
        try:
            container = self._get(operation, sandbox)
        except ContainerMissing:
            return None
        return container_info(container.attrs)

    def inspect(self, sandbox: str) -> ContainerInfo | None:
        return self._find("inspect", sandbox)

    def create(self, spec: SandboxSpec) -> ContainerInfo:
        existing = self._find("create", spec.name)
        if existing is not None:
            if existing.sandbox_id != spec.sandbox_id:
                raise DriverError(
                    "create",
                    f"container {container_name(spec.name)} already exists and belongs to sandbox id "
                    f"{existing.sandbox_id or '(none)'}",
                )
            return existing
        labels = labels_for(spec.name, spec.sandbox_id, spec.labels)
        volume = volume_name(spec.name)
        try:
            problem = foreign_workspace(volume, self._volume_labels("create", spec.name), spec.sandbox_id)
            if problem is not None:
                raise problem
        except ContainerMissing:
            self._call("create", self.client.volumes.create, volume, labels=labels)
        kwargs: dict[str, Any] = {
            "name": container_name(spec.name),
            "labels": labels,
            "volumes": {volume: {"bind": "/workspace", "mode": "rw"}},
            "network_mode": "none",
            "hostname": spec.name,
        }
        if spec.command:
            kwargs["command"] = spec.command
        container = self._call("create", self.client.containers.create, spec.image, **kwargs)
        container.reload()
        return container_info(container.attrs)

    # Start and stop address the container by name and inspect once after: two engine
    # calls, not three. Podman answers 304 for a container already in that state.

    def _by_name(self, sandbox: str) -> Any:
        return self.client.containers.prepare_model(attrs={"Id": container_name(sandbox)})

    def start(self, sandbox: str) -> ContainerInfo:
        container = self._by_name(sandbox)
        self._call("start", container.start)
        self._call("start", container.reload)
        return container_info(container.attrs)

    def stop(self, sandbox: str, timeout: float) -> ContainerInfo:
        container = self._by_name(sandbox)
        self._call("stop", container.stop, timeout=max(0, round(timeout)), ignore=True)
        self._call("stop", container.reload)
        return container_info(container.attrs)

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
                self._call("delete", self.client.volumes.remove, volume_name(sandbox), force=True)
        except ContainerMissing:
            pass
        return container_id

    def _volume_labels(self, operation: str, sandbox: str) -> dict[str, str] | None:
        volume = self._call(operation, self.client.volumes.get, volume_name(sandbox))
        return volume.attrs.get("Labels")

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
                )
        finally:
            client.close()

    def _streaming(self) -> PodmanClient:
        """A client without a read timeout: an exec or a followed log may be silent for long."""
        return PodmanClient(base_url=self.base_url, timeout=None)

    def exec(self, sandbox: str, command: list[str], output: Callable[[int, bytes], None]) -> int:
        client = self._streaming()
        try:
            api = client.api
            body = {"Cmd": command, "AttachStdout": True, "AttachStderr": True, "AttachStdin": False, "Tty": False}
            made = self._call("exec", api.post, f"/containers/{container_name(sandbox)}/exec", data=json.dumps(body))
            self._call("exec", made.raise_for_status)
            exec_id = made.json()["Id"]
            started = self._call(
                "exec",
                api.post,
                f"/exec/{exec_id}/start",
                data=json.dumps({"Detach": False, "Tty": False}),
                stream=True,
            )
            self._call("exec", started.raise_for_status)
            for out, err in stream_frames(started, demux=True):
                if out:
                    output(1, out)
                if err:
                    output(2, err)
            deadline = time.monotonic() + EXEC_SETTLE
            while True:
                info = self._call("exec", api.get, f"/exec/{exec_id}/json")
                self._call("exec", info.raise_for_status)
                state = info.json()
                if not state.get("Running") or time.monotonic() > deadline:
                    return int(state.get("ExitCode") or 0)
                time.sleep(0.02)
        finally:
            client.close()

    def logs(
        self, sandbox: str, tail: int | None = None, since: float | None = None, follow: bool = False
    ) -> Iterator[bytes]:
        client = self._streaming()
        try:
            container = self._call("logs", client.containers.get, container_name(sandbox))
            stream = self._call(
                "logs",
                container.logs,
                stream=True,
                follow=follow,
                tail=tail,
                since=None if since is None else int(since),
            )
            yield from stream
        finally:
            client.close()

    def interactive(self, sandbox: str, command: list[str], tty: bool) -> list[str]:
        return exec_command(["podman", "--url", self.base_url], sandbox, command, tty)

    def close(self) -> None:
        self.client.close()
