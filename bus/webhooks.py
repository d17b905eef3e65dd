"""The webhooks' bucket: each webhook (events/webhooks.py) under ``hook.<id>``, and the relay's
``joined.<id>`` once it has caught that webhook up with the log. Admins add and remove webhooks
(``sandboxctl webhook``), the relay (services/webhooks.py) reads them."""

from __future__ import annotations

import contextlib
import logging

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from sandboxctl.bus.reading import read_stream
from sandboxctl.bus.streams import key_value_bucket
from sandboxctl.events import subjects
from sandboxctl.events.webhooks import Webhook, webhook_decoder

log = logging.getLogger(__name__)

KEYS = f"$KV.{subjects.WEBHOOKS_BUCKET}."  # + a key: the subject of its entry


async def webhooks_bucket(js: JetStreamContext, replicas: int | None = None) -> KeyValue:
    """The webhooks' bucket, made if missing (replicas as the streams)."""
    return await key_value_bucket(
        js, subjects.WEBHOOKS_BUCKET, "sandboxctl: the webhooks the relay POSTs the log's events to", replicas
    )


def take(msg: Msg, hooks: dict[str, Webhook], joined: set[str]) -> None:
    """Fold one entry of the bucket, as its stream holds it, into ``hooks`` (by id) and ``joined``.
    An unreadable entry is skipped with an error: whoever may write the bucket may write garbage,
    and the other webhooks still work."""
    key = msg.subject.removeprefix(KEYS)
    removed = (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")
    if key.startswith(subjects.JOINED_PREFIX):
        hook_id = key.removeprefix(subjects.JOINED_PREFIX)
        (joined.discard if removed else joined.add)(hook_id)
        return
    if not key.startswith(subjects.WEBHOOK_PREFIX):
        return
    hook_id = key.removeprefix(subjects.WEBHOOK_PREFIX)
    if removed:
        hooks.pop(hook_id, None)
        return
    try:
        hook = webhook_decoder.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("webhooks: the entry %s is unreadable, skipped: %s", key[:80], exc)
        return
    if hook.id != hook_id:
        log.error("webhooks: the entry %s holds webhook %s; skipped", key[:80], hook.id)
        return
    hooks[hook_id] = hook


async def webhooks(js: JetStreamContext) -> tuple[dict[str, Webhook], set[str]]:
    """Every webhook, by id, and the ids the relay has joined, as the bucket holds them now."""
    hooks: dict[str, Webhook] = {}
    joined: set[str] = set()
    async for batch in read_stream(js, subjects.WEBHOOKS_STREAM, f"{KEYS}>"):
        for msg in batch:
            take(msg, hooks, joined)
    return hooks, joined


async def add_webhook(kv: KeyValue, hook: Webhook) -> None:
    await kv.create(subjects.WEBHOOK_PREFIX + hook.id, msgspec.json.encode(hook))


async def remove_webhook(kv: KeyValue, hook_id: str) -> bool:
    """Remove the webhook and the relay's mark of it; whether there was one."""
    try:
        await kv.get(subjects.WEBHOOK_PREFIX + hook_id)
    except KeyNotFoundError:
        return False
    await kv.delete(subjects.WEBHOOK_PREFIX + hook_id)
    with contextlib.suppress(KeyNotFoundError):
        await kv.delete(subjects.JOINED_PREFIX + hook_id)
    return True


async def mark_joined(kv: KeyValue, hook_id: str, seq: int) -> None:
    """The relay has delivered the webhook every event it wants up to ``seq``; from here on its
    durable consumer carries it."""
    with contextlib.suppress(KeyWrongLastSequenceError):
        await kv.put(subjects.JOINED_PREFIX + hook_id, str(seq).encode())
