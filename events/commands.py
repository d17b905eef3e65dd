"""Commands: what a user or another service asks sandboxctl to do.

Commands are flat JSON objects, tagged by a versioned ``type``, so a client in
any language can build one without an envelope. ``command_id`` is the
idempotency key: the state machine uses it as ``Nats-Msg-Id`` when it appends,
so a retried command never appends twice.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class _Command(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    name: str
    command_id: str
    actor: str = "anonymous"
    correlation_id: str = ""
    VERB: ClassVar[str] = ""


class CreateSandbox(_Command, tag="sandboxctl.command.create.v1"):
    image: str
    command: list[str] | None = None
    labels: dict[str, str] = {}
    driver: str = ""
    VERB: ClassVar[str] = "create"


class StopSandbox(_Command, tag="sandboxctl.command.stop.v1"):
    timeout: float = 10.0
    VERB: ClassVar[str] = "stop"


class StartSandbox(_Command, tag="sandboxctl.command.start.v1"):
    VERB: ClassVar[str] = "start"


class DeleteSandbox(_Command, tag="sandboxctl.command.delete.v1"):
    VERB: ClassVar[str] = "delete"


SandboxCommand = CreateSandbox | StopSandbox | StartSandbox | DeleteSandbox
COMMAND_TYPES: tuple[type[_Command], ...] = (CreateSandbox, StopSandbox, StartSandbox, DeleteSandbox)
command_decoder = msgspec.json.Decoder(SandboxCommand)
