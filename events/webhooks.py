"""Webhooks: the log's events POSTed over HTTP to services that do not speak NATS.

A webhook is one record in the webhooks' KV bucket (``subjects.WEBHOOKS_BUCKET``), keyed by its
id: the URL, the event types it wants, the secret its deliveries are signed with, and the log
position it was added at (it gets the events after it, never the history). Only an admin may
write the bucket or read it (the secrets are in it); the relay (services/webhooks.py) reads it.

Each delivery is a CloudEvent in HTTP binary mode: the event's ``data`` as the JSON body, its
envelope in ``ce-*`` headers, and the body's HMAC-SHA256 under the webhook's secret in
SIGNATURE_HEADER, so that the receiver can tell it came from this installation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from sandboxctl.events import limits

URL_MAX = 2048
SECRET_MIN = 16  # characters: a short secret is guessed, and then anyone can sign deliveries
SECRET_MAX = 4096
TYPES_MAX = 32  # patterns per webhook
TYPE_MAX = 80  # characters per pattern
ID_PATTERN = r"^[0-9a-f]{12}$"
SIGNATURE_HEADER = "X-Sandboxctl-Signature-256"  # "sha256=" and the body's HMAC in hex, as GitHub's

_TYPE = re.compile(r"^[a-z][a-z0-9_.]*$")


class Webhook(msgspec.Struct, kw_only=True, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=URL_MAX)]
    # Event types as ``events --type`` takes them (stopped, sandbox.failed, or a full type); none: all.
    types: Annotated[list[Annotated[str, msgspec.Meta(max_length=TYPE_MAX)]], msgspec.Meta(max_length=TYPES_MAX)] = []
    secret: Annotated[str, msgspec.Meta(min_length=SECRET_MIN, max_length=SECRET_MAX)]
    after_seq: Annotated[int, msgspec.Meta(ge=0, le=limits.SEQ_MAX)] = 0
    created_at: Annotated[str, msgspec.Meta(max_length=64)] = ""
    created_by: Annotated[str, msgspec.Meta(max_length=limits.ACTOR_MAX)] = ""


webhook_decoder = msgspec.json.Decoder(Webhook)


def url_problem(url: str) -> str:
    """Why ``url`` cannot be a webhook's ("" if it can): http or https, a host, no credentials
    (``webhook list`` shows URLs; a secret belongs in the secret file), bounded."""
    if len(url) > URL_MAX:
        return f"the URL is longer than {URL_MAX} characters"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "the URL has spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- a port that is not a number raises here
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"the URL must be http:// or https://, not {parts.scheme or 'none'}"
    if not parts.hostname:
        return "the URL has no host"
    if not parts.hostname.startswith("["):
        try:
            parts.hostname.encode("idna")
        except UnicodeError:
            return f"the URL's host {parts.hostname[:80]!r} is not a valid name"
    if parts.username is not None or parts.password is not None:
        return "the URL must not carry credentials (put the shared secret in --secret-file)"
    return ""


def type_matches(patterns: list[str], type_: str) -> bool:
    """``stopped``, ``sandbox.stopped`` or the full ``sandboxctl.sandbox.stopped.v1`` all select that type."""
    if not patterns:
        return True
    short = type_.split(".")
    return any(p == type_ or p in short[2:3] or type_.startswith(f"sandboxctl.{p}") for p in patterns)


def types_problem(patterns: list[str], known: list[str]) -> str:
    """Why ``patterns`` cannot select events ("" if they can): each must be well formed and
    select at least one of the ``known`` types, so that a typo is an error and not silence."""
    if len(patterns) > TYPES_MAX:
        return f"at most {TYPES_MAX} types"
    for p in patterns:
        if len(p) > TYPE_MAX or not _TYPE.fullmatch(p):
            return f"event type {p[:TYPE_MAX]!r} must be letters, digits, '_' and '.'"
        if not any(type_matches([p], t) for t in known):
            names = sorted({t.split(".")[2] for t in known if t.count(".") >= 3})
            return f"no event type matches {p!r}; types are {', '.join(names)}"
    return ""


def signature(secret: str, body: bytes) -> str:
    """The value of SIGNATURE_HEADER for ``body``: ``sha256=`` and its HMAC-SHA256 in hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
