"""The NATS subject scheme, in one place.

Sandbox names are single subject tokens, so a subject never needs escaping:
names are restricted to letters, digits, ``-`` and ``_`` (see
``statemachine.names``).
"""

from __future__ import annotations

PREFIX = "sandboxctl"

# Commands: request/reply, one subject per verb, e.g. sandboxctl.cmd.stop. With
# authorization on, the sender's NATS user name is a fourth token
# (sandboxctl.cmd.stop.alice): the server lets each user publish only on its own,
# so the token is the authenticated actor (see docs/security.md).
COMMANDS = f"{PREFIX}.cmd"
COMMANDS_ALL = f"{COMMANDS}.>"

# The log: JetStream stream LOG_STREAM, one subject per sandbox.
LOG_STREAM = "SANDBOXCTL_LOG"
LOG = f"{PREFIX}.log"
LOG_ALL = f"{LOG}.*"

# Driver facts: JetStream stream FACTS_STREAM, one subject per reporting host and sandbox
# (``fact``): a host's worker may publish on its own host's subjects only (docs/security.md).
FACTS_STREAM = "SANDBOXCTL_FACTS"
FACTS = f"{PREFIX}.fact"
FACTS_ALL = f"{FACTS}.>"

# Dead letters: messages a consumer gave up on, for operators. Stream DEADLETTER_STREAM.
DEADLETTER_STREAM = "SANDBOXCTL_DEADLETTER"
DEADLETTER = f"{PREFIX}.deadletter"
DEADLETTER_ALL = f"{DEADLETTER}.>"

# Denied attempts, for auditors: stream AUDIT_STREAM, one subject per user.
AUDIT_STREAM = "SANDBOXCTL_AUDIT"
AUDIT = f"{PREFIX}.audit"
AUDIT_ALL = f"{AUDIT}.>"

# Archived workspaces: a JetStream object store bucket, one object per archived sandbox.
WORKSPACES_BUCKET = "sandboxctl-workspaces"
WORKSPACES_STREAM = f"OBJ_{WORKSPACES_BUCKET}"  # the stream behind the bucket (JetStream's naming)

# The state machine's snapshot of every sandbox's state: a JetStream object store bucket.
SNAPSHOTS_BUCKET = "sandboxctl-snapshots"
SNAPSHOTS_STREAM = f"OBJ_{SNAPSHOTS_BUCKET}"
# The projectors' snapshots (their database), in a bucket of their own: a projector may write
# there, and nowhere the state machine reads its own from.
PROJECTIONS_BUCKET = "sandboxctl-projections"
PROJECTIONS_STREAM = f"OBJ_{PROJECTIONS_BUCKET}"
SNAPSHOT_LEASE = "statemachine-snapshot"  # the key the state machines take turns on to write it
PROJECTION_SNAPSHOT_LEASE = "projector-snapshot"  # the key the projectors take turns on to write theirs

# Leases: a JetStream key-value bucket whose entries expire; a key is held by one service at a time.
LEASES_BUCKET = "sandboxctl-leases"
LEASES_STREAM = f"KV_{LEASES_BUCKET}"
# Hosts: each driver worker's announcement of its host, under the host's name, renewed by its
# heartbeat; an entry not renewed for the heartbeat window is lost. A bucket of its own.
HOSTS_BUCKET = "sandboxctl-hosts"
HOSTS_STREAM = f"KV_{HOSTS_BUCKET}"
# Webhooks (events/webhooks.py): ``hook.<id>`` each webhook, written by admins; ``joined.<id>``
# the relay's mark that it has caught the webhook up with the log.
WEBHOOKS_BUCKET = "sandboxctl-webhooks"
WEBHOOKS_STREAM = f"KV_{WEBHOOKS_BUCKET}"
WEBHOOK_PREFIX = "hook."
JOINED_PREFIX = "joined."
RELAY_CONSUMER = "sandboxctl-webhooks"  # the relay's durable consumer of the log
REAPER_LEASE = "reaper"  # the key the reapers take turns on: one acts, the others stand by


def workspace_object(name: str, sandbox_id: str) -> str:
    """The object an archived sandbox's workspace is stored as: its name and id, so a sandbox made
    again under an old name never finds the old one's files."""
    return f"{name}/{sandbox_id}"


# Queries: request/reply against the projection.
QUERY = f"{PREFIX}.query"

# Core-NATS notice published after the projection commits a change.
PROJECTED = f"{PREFIX}.projected"

# Health: every process that runs services answers a request here (runtime/health.py).
HEALTH = f"{PREFIX}.health"

# Where replies may go: clients' inboxes, never a subject a stream captures. A request names
# its own reply subject, so a service that answered anywhere could be made to write the log.
INBOXES = "_INBOX."
INBOXES_ALL = f"{INBOXES}>"


def command(verb: str, user: str = "") -> str:
    """The subject of a command; ``user`` only when the server authenticates users."""
    return f"{COMMANDS}.{verb}.{user}" if user else f"{COMMANDS}.{verb}"


def denied(user: str) -> str:
    return f"{AUDIT}.denied.{user}"


def inbox_prefix(user: str) -> str:
    """Each user's reply inboxes live under a prefix of its own, so no one can subscribe to another's replies."""
    return f"{INBOXES}{user}"


def replies_to(reply: str, user: str = "") -> bool:
    """Whether a request's reply subject is an inbox a service may answer on: the sending user's
    own (``_INBOX.<user>.``) when users are authenticated, any ``_INBOX.`` one otherwise."""
    return reply.startswith(f"{inbox_prefix(user)}." if user else INBOXES)


def log(name: str) -> str:
    return f"{LOG}.{name}"


def fact(name: str, host: str = "") -> str:
    """Where the worker of ``host`` reports a fact about sandbox ``name``: the host token is the
    reporter's, which NATS binds to the worker's user, so the state machine can tell who speaks
    (a worker of no host, before hosts, reports on ``sandboxctl.fact.<name>``)."""
    return f"{FACTS}.{host}.{name}" if host else f"{FACTS}.{name}"


def facts_of(name: str) -> str:
    """Every host's facts about sandbox ``name`` (a filter; a worker of no host's are ``fact(name)``)."""
    return f"{FACTS}.*.{name}"


def reporter_of(subject: str) -> str | None:
    """The host whose worker reported the fact on ``subject``; None for a worker of no host."""
    tokens = subject.split(".")
    return tokens[2] if len(tokens) == 4 else None


def query(kind: str) -> str:
    return f"{QUERY}.{kind}"


def projected(name: str) -> str:
    return f"{PROJECTED}.{name}"


def deadletter(consumer: str, name: str) -> str:
    return f"{DEADLETTER}.{consumer}.{name}"


def name_of(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]
