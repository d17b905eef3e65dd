"""FakeDriver: answers every operation at once without an engine.

Allowed only where the control plane alone is measured (the throughput and
memory benchmarks) so that no engine time hides sandboxctl's own cost. Never
used by the product or by its tests of engine behaviour.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from sandboxctl.drivers.base import ContainerInfo, ContainerMissing, EngineEvent, SandboxSpec


class FakeDriver:
    name = "fake"
    parallelism = 256
    timeout = 0.0  # it answers at once

    def __init__(self) -> None:
        self._containers: dict[str, ContainerInfo] = {}
        self._runs = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def _run(self, sandbox: str, sandbox_id: str, running: bool) -> ContainerInfo:
        with self._lock:
            info = self._containers.get(sandbox)
            if info is None or info.sandbox_id != sandbox_id:
                raise ContainerMissing("start", f"no container for {sandbox}")
            if running and not info.running:
                self._runs += 1
                info = ContainerInfo(
                    sandbox=sandbox,
                    sandbox_id=info.sandbox_id,
                    container_id=info.container_id,
                    running=True,
                    status="running",
                    incarnation=str(self._runs),
                )
            elif not running and info.running:
                info = ContainerInfo(
                    sandbox=sandbox,
                    sandbox_id=info.sandbox_id,
                    container_id=info.container_id,
                    running=False,
                    status="exited",
                    incarnation=info.incarnation,
                )
            self._containers[sandbox] = info
            return info

    def ping(self) -> None:
        return None

    def create(self, spec: SandboxSpec) -> ContainerInfo:
        with self._lock:
            info = self._containers.get(spec.name)
            if info is None:
                info = ContainerInfo(
                    sandbox=spec.name,
                    sandbox_id=spec.sandbox_id,
                    container_id=f"fake-{spec.name}",
                    running=False,
                    status="created",
                )
                self._containers[spec.name] = info
            return info

    def start(self, sandbox: str, sandbox_id: str, launched: Callable[[], None] | None = None) -> ContainerInfo:
        return self._run(sandbox, sandbox_id, True)

    def stop(self, sandbox: str, sandbox_id: str, timeout: float) -> ContainerInfo:
        return self._run(sandbox, sandbox_id, False)

    def delete(self, sandbox: str, sandbox_id: str) -> str:
        with self._lock:
            info = self._containers.get(sandbox)
            if info is None or info.sandbox_id != sandbox_id:
                return ""
            del self._containers[sandbox]
        return info.container_id

    def inspect(self, sandbox: str, sandbox_id: str) -> ContainerInfo | None:
        info = self._containers.get(sandbox)
        return info if info is not None and info.sandbox_id == sandbox_id else None

    def workspace(self, sandbox: str, sandbox_id: str) -> bool:
        return self.inspect(sandbox, sandbox_id) is not None

    def list_managed(self) -> list[ContainerInfo]:
        with self._lock:
            return list(self._containers.values())

    def prepare(self) -> None:
        """Nothing to make ahead."""

    def events(self, since: float | None = None) -> Iterator[EngineEvent]:
        self._stopped.wait()  # a fake engine changes nothing behind our back
        return iter(())

    def close(self) -> None:
        self._stopped.set()
