"""Every sandbox's state, folded from the whole log once.

For readers that need the log's view at one moment rather than a live cache:
the driver worker's reconciliation compares it with what the engine has.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from events import subjects
from services.log import fold_logged
from services.tail import Tail, stream_seq
from statemachine import SandboxState

log = logging.getLogger(__name__)


async def load_states(js: JetStreamContext) -> dict[str, SandboxState]:
    tail = Tail(js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=1, idle_timeout=0.5)
    states: dict[str, SandboxState] = {}
    target = await tail.last_seq()
    if target == 0:
        return states
    try:
        async for batch in tail.batches():
            for msg in batch:
                seq = stream_seq(msg)
                name = subjects.name_of(msg.subject)
                state, _, problem = fold_logged(states.get(name), name, msg.data, seq)
                if problem:
                    log.debug("log seq %d of %s is skipped: %s", seq, name, problem)
                if state is not None:
                    states[name] = state
            if tail.next_seq > target:
                return states
    finally:
        await tail.close()
    return states
