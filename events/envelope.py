"""The envelope every message travels in.

Attribute names follow CloudEvents (structured JSON mode) so that operators'
tooling recognises them; correlation and causation ids are CloudEvents
extension attributes, which must be lowercase letters only. The payload sits
under ``data`` and its shape is chosen by ``type``, which always ends in a
version (``.v1``) so that a reader can upcast old payloads instead of failing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec


class Envelope(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    type: str
    source: str
    subject: str
    time: datetime
    data: Any = None
    actor: str = ""
    correlationid: str = ""
    causationid: str = ""
    # On the events a command caused: a digest of that command, which binds its idempotency key
    # (the event id's prefix) to it, so that the key used again with another command is refused.
    commanddigest: str = ""
    specversion: str = "1.0"
    datacontenttype: str = "application/json"


class RawEnvelope(msgspec.Struct, kw_only=True):
    """First decoding pass: the envelope with its payload left undecoded."""

    id: str
    type: str
    subject: str
    source: str = ""
    time: datetime | None = None
    data: msgspec.Raw = msgspec.Raw(b"{}")
    actor: str = ""
    correlationid: str = ""
    causationid: str = ""
    commanddigest: str = ""


_encoder = msgspec.json.Encoder()
_raw_decoder = msgspec.json.Decoder(RawEnvelope)


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> datetime:
    return datetime.now(UTC)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


class UnknownType(ValueError):
    pass


def decode_envelope(payload: bytes, registry: Mapping[str, type]) -> Envelope:
    """Decode an envelope whose payload type is looked up in ``registry``.

    Raises ``msgspec.ValidationError``/``msgspec.DecodeError`` for malformed
    input and ``UnknownType`` for a type this reader does not know.
    """
    raw = _raw_decoder.decode(payload)
    data_type = registry.get(raw.type)
    if data_type is None:
        raise UnknownType(f"unknown message type {raw.type!r}")
    data: Any = msgspec.json.decode(raw.data, type=data_type)
    upcast = getattr(data, "upcast", None)
    if upcast is not None:
        data = upcast()
    return Envelope(
        id=raw.id,
        type=type_name(type(data)),
        source=raw.source,
        subject=raw.subject,
        time=raw.time or now(),
        data=data,
        actor=raw.actor,
        correlationid=raw.correlationid,
        causationid=raw.causationid,
        commanddigest=raw.commanddigest,
    )


def type_name(cls: type) -> str:
    return cls.TYPE  # type: ignore[attr-defined,no-any-return]
