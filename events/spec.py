"""What a sandbox is made of besides its image: the resources its engine enforces and the
environment of its processes. Commands carry these (create, update) and the log records them
(created, updated), so every reader of the log knows what each sandbox ran with."""

from __future__ import annotations

from typing import Annotated

import msgspec

from sandboxctl.events import limits

Cpus = Annotated[
    float,
    msgspec.Meta(gt=0, le=limits.CPUS_MAX, description="CPUs, as a fraction of cores (1.5: one and a half)."),
]
Memory = Annotated[
    int,
    msgspec.Meta(ge=limits.MEMORY_MIN, le=limits.MEMORY_MAX, description="Memory limit in bytes."),
]
Pids = Annotated[
    int,
    msgspec.Meta(ge=limits.PIDS_MIN, le=limits.PIDS_MAX, description="The most processes the sandbox may run."),
]
EnvKey = Annotated[str, msgspec.Meta(max_length=limits.ENV_KEY_MAX, pattern=limits.ENV_KEY_PATTERN)]
EnvValue = Annotated[str, msgspec.Meta(max_length=limits.ENV_VALUE_MAX)]
Env = Annotated[
    dict[EnvKey, EnvValue],
    msgspec.Meta(
        max_length=limits.ENV_MAX,
        description="Environment variables of the sandbox's processes. Written to the log in clear: "
        "never pass secrets this way.",
    ),
]


class Resources(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, forbid_unknown_fields=True):
    """Limits the engine enforces on the sandbox's container; an absent one is the engine's default
    (no limit). A key it does not know is refused, so a misspelt limit is never silently dropped."""

    cpus: Cpus | None = None
    memory: Memory | None = None
    pids: Pids | None = None

    def merged(self, changes: Resources) -> Resources:
        """These resources with each limit ``changes`` names put in its place."""
        return Resources(
            cpus=self.cpus if changes.cpus is None else changes.cpus,
            memory=self.memory if changes.memory is None else changes.memory,
            pids=self.pids if changes.pids is None else changes.pids,
        )

    def __bool__(self) -> bool:
        return self.cpus is not None or self.memory is not None or self.pids is not None


NO_RESOURCES = Resources()
