"""The NATS subject scheme, in one place.

Sandbox names are single subject tokens, so a subject never needs escaping:
names are restricted to letters, digits, ``-`` and ``_`` (see
``statemachine.names``).
"""

from __future__ import annotations

PREFIX = "sandboxctl"

# Commands: request/reply, one subject per verb, e.g. sandboxctl.cmd.stop.
COMMANDS = f"{PREFIX}.cmd"
COMMANDS_ALL = f"{COMMANDS}.>"

# The log: JetStream stream LOG_STREAM, one subject per sandbox.
LOG_STREAM = "SANDBOXCTL_LOG"
LOG = f"{PREFIX}.log"
LOG_ALL = f"{LOG}.*"

# Driver facts: JetStream stream FACTS_STREAM, one subject per sandbox.
FACTS_STREAM = "SANDBOXCTL_FACTS"
FACTS = f"{PREFIX}.fact"
FACTS_ALL = f"{FACTS}.*"

# Dead letters: messages a consumer gave up on, for operators. Stream DEADLETTER_STREAM.
DEADLETTER_STREAM = "SANDBOXCTL_DEADLETTER"
DEADLETTER = f"{PREFIX}.deadletter"
DEADLETTER_ALL = f"{DEADLETTER}.>"

# Queries: request/reply against the projection.
QUERY = f"{PREFIX}.query"

# Core-NATS notice published after the projection commits a change.
PROJECTED = f"{PREFIX}.projected"


def command(verb: str) -> str:
    return f"{COMMANDS}.{verb}"


def log(name: str) -> str:
    return f"{LOG}.{name}"


def fact(name: str) -> str:
    return f"{FACTS}.{name}"


def query(kind: str) -> str:
    return f"{QUERY}.{kind}"


def projected(name: str) -> str:
    return f"{PROJECTED}.{name}"


def deadletter(consumer: str, name: str) -> str:
    return f"{DEADLETTER}.{consumer}.{name}"


def name_of(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]
