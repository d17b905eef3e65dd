"""The bounds of every field a client may send, stated once.

Commands come from other services, careless or hostile: every string has a
maximum length, every collection a maximum size and every number a finite
range. The command types in ``events.commands`` carry these as msgspec
constraints, so a command outside them is refused at decoding (with
``invalid_argument``) and the AsyncAPI document states them; the CLI checks
the same constants before it sends anything. Together they keep every event
the state machine appends far below NATS's maximum payload (1 MiB by default).
"""

from __future__ import annotations

# A sandbox name is one NATS subject token and part of a container name (statemachine/names.py).
NAME_MAX = 63
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"

# The idempotency key: letters, digits and ``. _ : @ -``. No ``/``: the state machine keeps
# the ids of events that answer facts, the watchdog and each authenticated user apart with
# it (see services/statemachine.py), so no command can take another's id.
COMMAND_ID_MAX = 128
COMMAND_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"

# A host: one NATS subject token (work orders and consumers are named by it), like a sandbox name.
HOST_MAX = 63
HOST_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9_-]{0,62})?$"  # "" where no host is named
CONSTRAINTS_MAX = 16  # key=value pairs a create may require of its host's labels
HOST_ENGINES_MAX = 8
HOST_SANDBOXES_MAX = 100_000  # the most sandboxes a host may say it takes

ACTOR_MAX = 200
CORRELATION_ID_MAX = 200
IMAGE_MAX = 512
DRIVER_MAX = 32
REASON_MAX = 512  # a stop's or a delete's reason, a hold's reason
HOLDER_MAX = 200
VIA_MAX = 32
KIND_MAX = 16

# The main process's command line: how many arguments, and how long each may be.
COMMAND_ARGS_MAX = 256
COMMAND_ARG_MAX = 8192
COMMAND_BYTES_MAX = 65536  # all arguments together

# Labels: at most this many, keys and values bounded like Kubernetes' (a key names one
# thing; a value is short). Keys are what ``list --label`` selects on.
LABELS_MAX = 64
LABEL_KEY_MAX = 128
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
LABEL_VALUE_MAX = 256
RESERVED_LABEL_PREFIX = "sandboxctl."  # sandboxctl's own labels on containers and volumes

# Resources a sandbox may ask of its engine. CPUs as a fraction of cores (``--cpus 1.5``),
# memory in bytes, and the most processes it may run. The memory floor is docker's (6 MiB):
# below it an engine refuses to start the container, so it is refused here first.
CPUS_MAX = 512.0
MEMORY_MIN = 6 * 1024 * 1024
MEMORY_MAX = 2**40  # 1 TiB
# A vm sandbox's guest kernel does not boot in less (measured: drivers/vm, docs/vm.md).
VM_MEMORY_MIN = 96 * 1024 * 1024
PIDS_MIN = 8  # a shell and an exec need a few; fewer leaves a sandbox that cannot run a command
PIDS_MAX = 4_194_304  # the kernel's own maximum (pid_max)

# Environment variables: POSIX names, bounded values. They are written to the log, and every
# reader of the log (history, audit, replay) sees them: never a place for secrets.
ENV_MAX = 128
ENV_KEY_MAX = 128
ENV_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
ENV_VALUE_MAX = 4096

# A path in a sandbox named by ``cp`` (Linux's PATH_MAX).
PATH_MAX = 4096

# Seconds. A stop's grace period (SIGTERM, then SIGKILL after it): an hour at most.
GRACE_MAX = 3600.0
# A lease's ttl and the reaper's warning grace: a day at most.
TTL_MAX = 86400.0
# Idle timeout and auto-delete: a year at most (0 is off).
IDLE_MAX = 366 * 86400.0
# A log sequence named in a command (the reaper's ``activity_seq``) or a query's cursor.
SEQ_MAX = 2**63 - 1

# Items per page of the ``list`` and ``history`` queries: when a request names no limit, and
# the most it may ask for. A page is also cut before it passes the max payload.
PAGE_LIMIT_DEFAULT = 500
PAGE_LIMIT_MAX = 5000
# Sandboxes one page of a bulk command acts on (the state machine answers a page at a time).
BULK_PAGE_DEFAULT = 500
BULK_PAGE_MAX = 1000
# A snapshot is written once the log has grown this many entries past the last one: an instance
# that starts folds at most about this many entries after reading it (a state machine folds about
# 90,000 a second). SANDBOXCTL_SNAPSHOT_EVERY sets another.
SNAPSHOT_EVERY = 20_000
