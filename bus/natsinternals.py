"""The few things sandboxctl needs of nats-py that it offers no public way to reach, in one place.

Each is read from nats-py's own attributes: a JetStream context's connection and API prefix,
a connection's inbox prefix and the server's INFO. Should nats-py rename one, this module (and
its test, tests of the readers that use it) is what changes.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext


def connection_of(js: JetStreamContext) -> NATS:
    """The connection a JetStream context publishes on: readers subscribe on it directly."""
    nc: NATS = js._nc
    return nc


def api_prefix(js: JetStreamContext) -> str:
    """The JetStream API prefix (``$JS.API``, or a domain's): a pull reader builds its
    ``CONSUMER.MSG.NEXT`` subject from it."""
    prefix: str = js._prefix
    return prefix


def inbox_prefix(nc: NATS) -> str:
    """The connection's reply-inbox prefix, which a reader process must share to be allowed its
    own replies (users' inboxes live under a prefix of their own: see auth)."""
    prefix = nc._inbox_prefix
    return bytes(prefix).decode() if prefix else ""


def server_requires_auth(nc: NATS) -> bool:
    """Whether the server this connection reached authenticates users (its INFO says so)."""
    return bool(nc._server_info.get("auth_required"))
