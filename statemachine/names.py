"""Sandbox names double as NATS subject tokens and container names."""

from __future__ import annotations

import re

from sandboxctl.events.limits import NAME_MAX, NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)


def validate_name(name: str) -> str | None:
    """Return why ``name`` is unusable, or None if it is fine.

    The whole name must match (``fullmatch``: ``$`` alone also matches before a
    trailing newline), and the message quotes at most the start of a bad name,
    so that a huge one cannot make the reply too big to send.
    """
    if not name:
        return "sandbox name must not be empty"
    if not _NAME.fullmatch(name):
        shown = repr(name[:40]) + ("..." if len(name) > 40 else "")
        return (
            f"invalid sandbox name {shown}: use 1-{NAME_MAX} letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return None
