"""Sandbox names double as NATS subject tokens and container names."""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def validate_name(name: str) -> str | None:
    """Return why ``name`` is unusable, or None if it is fine."""
    if not name:
        return "sandbox name must not be empty"
    if not _NAME.match(name):
        return f"invalid sandbox name {name!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
    return None
