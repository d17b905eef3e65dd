"""One holder at a time: a lease on a key of a JetStream key-value bucket whose entries expire.

A holder takes the key with a create (refused while anyone holds it) and keeps it by updating
it, each update naming the revision it holds, before the bucket's age limit (``LEASE_TTL``)
drops it. A holder that dies stops updating, the entry expires, and another takes it. A holder
counts itself the holder for a third of the TTL after its last successful write began, so two
never both believe they hold it, even across a fail-over (clocks aside: JetStream ages the
entry from when it stored it, which is after the write began)."""

from __future__ import annotations

import contextlib
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from sandboxctl.bus.streams import key_value_bucket
from sandboxctl.events import subjects

log = logging.getLogger(__name__)

LEASE_TTL = 10.0  # seconds a lease lasts unless renewed: how long a dead holder's work waits


async def leases(js: JetStreamContext, replicas: int | None = None, ttl: float = LEASE_TTL) -> KeyValue:
    """The leases' bucket, made if missing (replicas as the streams: 3 on a cluster, else 1)."""
    return await key_value_bucket(
        js, subjects.LEASES_BUCKET, "sandboxctl: leases, one holder per key at a time", replicas, ttl
    )


class Lease:
    """The lease on ``key`` for ``holder`` (a name that says who, in logs and in the bucket)."""

    def __init__(self, js: JetStreamContext, key: str, holder: str, ttl: float = LEASE_TTL) -> None:
        self.js, self.key, self.holder, self.ttl = js, key, holder, ttl
        self._kv: KeyValue | None = None
        self._revision = 0
        self._since = 0.0  # when the last successful write began (monotonic)

    @property
    def held(self) -> bool:
        return bool(self._revision) and time.monotonic() - self._since < self.ttl / 3

    async def hold(self) -> bool:
        """Take or keep the lease; whether this holder holds it now. Writes at most every third
        of the TTL while held; while a write fails (NATS away) it is not held."""
        if self.held:
            return True
        began = time.monotonic()
        try:
            if self._kv is None:
                self._kv = await leases(self.js, ttl=self.ttl)
            value = self.holder.encode()
            if self._revision:
                self._revision = await self._kv.update(self.key, value, last=self._revision)
            else:
                self._revision = await self._kv.create(self.key, value)
                log.info("%s holds the %s lease", self.holder, self.key)
        except KeyWrongLastSequenceError:  # someone else holds it (or took it after ours expired)
            if self._revision:
                log.warning("%s lost the %s lease", self.holder, self.key)
            self._revision = 0
            return False
        except Exception as exc:
            # Not held while it cannot be written; the revision is kept, so a renewal that gets
            # through before the entry expired keeps it (an update naming it fails once it has).
            if self._revision:
                log.warning("%s cannot renew the %s lease: %r", self.holder, self.key, exc)
            self._since = 0.0
            return False
        self._since = began
        return True

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), so another holder need not wait for the TTL."""
        revision, self._revision = self._revision, 0
        if revision and self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(self.key, last=revision)
