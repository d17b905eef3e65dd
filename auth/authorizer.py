"""The state machine's side of authorization: the roles a command's user has, the refusal it
records in the audit stream before it answers, and that stream."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext

from sandboxctl.auth.roles import ADMIN, COMPONENT_ROLES, VERB_ROLE, has_role
from sandboxctl.auth.store import AuthStore
from sandboxctl.bus.publish import publish
from sandboxctl.events import subjects
from sandboxctl.events.denied import DeniedAttempt


class Authorizer:
    """The state machine's view of users.json: roles by user, re-read when the file changes."""

    def __init__(self, store: AuthStore) -> None:
        self.store = store
        self._stamp: tuple[int, int] | None = None
        self._roles: dict[str, list[str]] = {}

    def roles(self, user: str) -> list[str] | None:
        """The user's roles, or None for a user that does not exist (or is a service that sends no commands)."""
        try:
            st = self.store.users_path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            users = self.store.load()
            self._roles = {
                u.name: list(u.roles) if not u.component else COMPONENT_ROLES[u.component]
                for u in users.values()
                if not u.component or u.component in COMPONENT_ROLES
            }
            self._stamp = stamp
        return self._roles.get(user)


def check(authorizer: Authorizer, subject: str, command: Any) -> DeniedAttempt | None:
    """Whether the command on ``subject`` may run: None, or the attempt to record and refuse.

    The user is the subject's fourth token, which only that user can publish
    on (its NATS permissions), so it is authenticated by the server."""
    tokens = subject.split(".")
    user = tokens[3] if len(tokens) == 4 else ""
    needed = VERB_ROLE.get(command.VERB, ADMIN)
    roles = authorizer.roles(user) if user else None
    if not user:
        reason = f"commands must be sent on {subjects.command(command.VERB, '<user>')} with authorization on"
    elif roles is None:
        reason = f"user {user} has no roles"
    elif not has_role(roles, needed):
        reason = f"user {user} may not {command.VERB}: it needs {needed}, and has {', '.join(roles) or 'no role'}"
    else:
        return None
    return DeniedAttempt(
        id=f"{user or '_'}:{command.command_id or secrets.token_hex(8)}",
        time=datetime.now(UTC).isoformat(),
        user=user or "_",
        action=command.VERB,
        sandbox=command.name[:63],
        subject=subject[:200],
        required=needed,
        roles=roles or [],
        reason=reason,
        command_id=command.command_id[:200],
        claimed_actor=command.actor[:200],
    )


async def record_denied(js: JetStreamContext, attempt: DeniedAttempt) -> None:
    """Store the refusal before it is answered, so a caller who saw the reply finds the record."""
    await publish(
        js,
        subjects.denied(attempt.user),
        msgspec.json.encode(attempt),
        subjects.AUDIT_STREAM,
        {"Nats-Msg-Id": attempt.id},
    )
