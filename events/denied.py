"""A refused command, as the audit stream records it.

Auditors need the attempts that did not happen as much as the ones that did,
and the log must hold only what did: so a denied command is written here, to
stream SANDBOXCTL_AUDIT, and never to the log.
"""

from __future__ import annotations

import msgspec


class DeniedAttempt(msgspec.Struct, kw_only=True, tag_field="type", tag="sandboxctl.audit.denied.v1"):
    id: str  # unique per attempt: "<user>:<command_id>"
    time: str  # ISO 8601, UTC
    user: str  # the authenticated NATS user (the command subject's last token)
    action: str  # the verb: create, stop, start or delete
    sandbox: str  # the sandbox named in the command ("" if the name was not readable)
    subject: str  # the NATS subject the command came on
    required: str  # the role the action needs
    roles: list[str] = []  # the roles the user has
    reason: str  # why it was refused, one line
    command_id: str = ""
    claimed_actor: str = ""  # the actor the payload claimed, kept as evidence
