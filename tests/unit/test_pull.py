"""The durable pull reader's reading of a JetStream reply subject (sandboxctl.bus.tail), without
a server: the subject tells the stream and consumer sequences and the delivery count, as nats-py
reads them. The reader against a real nats-server is tests/integration/test_pull.py."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from sandboxctl.bus.tail import deliveries, sequences


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.SANDBOXCTL_LOG.c1.3.1042.77.1732890000000000000.5",
        "$JS.ACK._.ACCHASH.SANDBOXCTL_LOG.c1.3.1042.77.1732890000000000000.5.x9Zr",
        "$JS.ACK.hub.ACCHASH.SANDBOXCTL_LOG.c1.1.1042.77.1732890000000000000.0",
    ],
)
def test_sequences_reads_the_reply_subject_as_nats_py_does(reply: str) -> None:
    meta = Msg.Metadata._from_reply(reply)
    assert sequences(reply) == (meta.sequence.stream, meta.sequence.consumer) == (1042, 77)
    assert deliveries(Msg(None, reply=reply)) == meta.num_delivered  # type: ignore[arg-type]
