"""The few things sandboxctl needs of nats-py that it offers no public way to reach, in one place.

Each is read from nats-py's own attributes: a JetStream context's connection and API prefix,
a connection's inbox prefix and the server's INFO, a callback added to a connection made
elsewhere; and ``settle``, a way round nats-py's ``flush``. Should nats-py rename one, this
module (and its test, tests of the readers that use it) is what changes.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
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


async def settle(nc: NATS, timeout: float = 5.0) -> None:
    """Return once the server has processed everything this connection sent before (its
    subscriptions above all). nats-py's ``flush`` cannot promise that: it writes its PING straight
    to the socket, ahead of commands still queued for its flusher, so its PONG may come back before
    a subscription just made reaches the server (another client's request then finds no
    responders). A message this connection publishes to itself travels behind them."""
    inbox = nc.new_inbox()
    arrived = asyncio.Event()

    async def heard(_msg: Msg) -> None:
        arrived.set()

    sub = await nc.subscribe(inbox, cb=heard)
    try:
        await nc.publish(inbox, b"")
        await asyncio.wait_for(arrived.wait(), timeout)
    finally:
        await sub.unsubscribe()


# Per connection, the callbacks added by ``on_reconnected``, held weakly.
_RECONNECTED: weakref.WeakKeyDictionary[NATS, list[weakref.WeakMethod[Callable[[], Awaitable[None]]]]] = (
    weakref.WeakKeyDictionary()
)


def on_reconnected(nc: NATS, callback: Callable[[], Awaitable[None]]) -> None:
    """Have the bound method ``callback`` called each time ``nc`` has connected again (to the same
    server or another of the cluster's), after whatever callback it was made with. Held weakly:
    the many clients one connection serves over its life do not pile up on it."""
    listeners = _RECONNECTED.get(nc)
    if listeners is None:
        listeners = _RECONNECTED[nc] = []
        before = nc._reconnected_cb
        held = listeners

        async def every() -> None:
            if before is not None:
                await before()
            for ref in list(held):
                method = ref()
                if method is None:
                    held.remove(ref)
                else:
                    await method()

        nc._reconnected_cb = every
    listeners[:] = [ref for ref in listeners if ref() is not None]
    listeners.append(weakref.WeakMethod(callback))
