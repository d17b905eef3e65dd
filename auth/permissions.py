"""The NATS permissions of every user and service, and the server configuration that holds them.

Least privilege: each service gets exactly the subjects its code uses; a person or another
service gets its own command subjects and, by role, the streams it may read (docs/security.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from sandboxctl.auth.roles import (
    ADMIN,
    DRIVERS,
    READ,
    STATEMACHINE_CONSUMER,
    User,
    adopts_unplaced,
    component_user,
    has_role,
)
from sandboxctl.events import subjects
from sandboxctl.events.hosts import DRAIN_PREFIX, UNPLACED_PREFIX

API = "$JS.API"


def _stream_reader(stream: str) -> list[str]:
    """What a Tail (an ephemeral ordered push consumer) needs to read ``stream``."""
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}",  # ephemeral only: the server refuses a durable name here
        f"{API}.CONSUMER.DELETE.{stream}.*",  # its own, when it closes (the services' durables are denied)
        f"$JS.FC.{stream}.>",  # flow-control replies
    ]


def _durable(stream: str, consumer: str) -> list[str]:
    """What a service needs to work a durable pull consumer of its own."""
    return [
        f"{API}.CONSUMER.INFO.{stream}.{consumer}",
        f"{API}.CONSUMER.CREATE.{stream}.{consumer}",  # nats-py names the durable,
        f"{API}.CONSUMER.CREATE.{stream}.{consumer}.>",  # with its filter subject appended
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",  # older clients
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"{API}.CONSUMER.UNPIN.{stream}.{consumer}",  # a pinned consumer's reader that stops
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _stream_info(*streams: str) -> list[str]:
    return [f"{API}.STREAM.INFO.{s}" for s in streams]


def _objects(bucket: str, stream: str) -> list[str]:
    """What a service needs of an object store bucket: make it if missing, put, read (an ordered
    consumer), purge the chunks an object no longer uses, delete. The driver workers keep archived
    workspaces in one, the state machines their snapshot in another, the projectors theirs in a third."""
    return [
        *_stream_reader(stream),
        f"{API}.STREAM.CREATE.{stream}",
        f"{API}.STREAM.PURGE.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"$O.{bucket}.>",
        f"{API}.STREAM.NAMES",  # nats-py's get finds the bucket's stream by its chunks' subject
    ]


def _lease(key: str) -> list[str]:
    """What a service needs to take turns on one key of the leases' bucket (bus/lease.py): make
    the bucket if missing, write and delete that key, read it back (nats-py's create does, to
    tell a deleted key from a held one)."""
    return [
        f"{API}.STREAM.INFO.{subjects.LEASES_STREAM}",
        f"{API}.STREAM.CREATE.{subjects.LEASES_STREAM}",
        f"{API}.STREAM.MSG.GET.{subjects.LEASES_STREAM}",
        f"{API}.DIRECT.GET.{subjects.LEASES_STREAM}.$KV.{subjects.LEASES_BUCKET}.{key}",
        f"$KV.{subjects.LEASES_BUCKET}.{key}",
    ]


CORE_STREAMS = (subjects.LOG_STREAM, subjects.FACTS_STREAM, subjects.DEADLETTER_STREAM)
# Nobody but their owner may delete the services' durable consumers.
PROTECTED_CONSUMERS = [f"{API}.CONSUMER.DELETE.{subjects.LOG_STREAM}.sandboxctl-driver-{d}" for d in DRIVERS] + [
    f"{API}.CONSUMER.DELETE.{subjects.FACTS_STREAM}.{STATEMACHINE_CONSUMER}",
    f"{API}.CONSUMER.DELETE.{subjects.LOG_STREAM}.{subjects.RELAY_CONSUMER}",
]


def _webhooks(keys: str) -> list[str]:
    """What reading the webhooks' bucket takes (bus/webhooks.py: its keys, each entry), making it
    if missing, and writing the ``keys`` given (a subject pattern under the bucket)."""
    return [
        *_stream_reader(subjects.WEBHOOKS_STREAM),
        f"{API}.STREAM.CREATE.{subjects.WEBHOOKS_STREAM}",
        f"{API}.DIRECT.GET.{subjects.WEBHOOKS_STREAM}.>",
        f"$KV.{subjects.WEBHOOKS_BUCKET}.{keys}",
    ]


def _hosts_reader() -> list[str]:
    """What reading the hosts' bucket takes (bus/hosts.py: a watch, and reads of one entry)."""
    return _stream_reader(subjects.HOSTS_STREAM)


def _host_announcer(host: str, adopts: bool) -> list[str]:
    """What announcing ``host`` takes: make the bucket if missing, write that one key, read it;
    with ``adopts``, claim the sandboxes placed on no host too (bus.hosts.claim_unplaced)."""
    unplaced = [
        *(f"$KV.{subjects.HOSTS_BUCKET}.{UNPLACED_PREFIX}{engine}" for engine in DRIVERS),
        *(
            f"{API}.DIRECT.GET.{subjects.HOSTS_STREAM}.$KV.{subjects.HOSTS_BUCKET}.{UNPLACED_PREFIX}{engine}"
            for engine in DRIVERS
        ),
    ]
    return [
        f"{API}.STREAM.INFO.{subjects.HOSTS_STREAM}",
        f"{API}.STREAM.CREATE.{subjects.HOSTS_STREAM}",
        f"{API}.STREAM.MSG.GET.{subjects.HOSTS_STREAM}",
        f"{API}.DIRECT.GET.{subjects.HOSTS_STREAM}.$KV.{subjects.HOSTS_BUCKET}.{host}",
        f"$KV.{subjects.HOSTS_BUCKET}.{host}",
        *(unplaced if adopts else []),
    ]


def protected_consumers(hosts: Iterable[str] = ()) -> list[str]:
    """Deletes denied to everyone: the services' durables, the driver workers' of each host too."""
    per_host = [
        f"{API}.CONSUMER.DELETE.{subjects.LOG_STREAM}.sandboxctl-driver-{d}-{h}" for d in DRIVERS for h in sorted(hosts)
    ]
    return [*PROTECTED_CONSUMERS, *per_host]


def component_permissions(
    component: str, host: str = "", protected: list[str] = PROTECTED_CONSUMERS, user: str = ""
) -> dict[str, Any]:
    """Least privilege per service: exactly the subjects its code uses (see docs/security.md).

    Every service may hear ``sandboxctl.health``: the process that runs it reports its services'
    health (runtime/health.py). The answer goes to the asker's inbox, so a service that does
    not answer requests anyway may publish to inboxes (``_INBOX.>``) rather than get
    ``allow_responses``: nats-server lets a response go to whatever reply subject the asker
    named, the log's included, even past a deny rule. ``user`` is the user's name when it is not
    the component's own (a host's worker, ``host_worker_user``): its inboxes are under it."""
    inbox = f"{subjects.inbox_prefix(user or component_user(component))}.>"
    if component == "statemachine":
        streams = (*CORE_STREAMS, subjects.AUDIT_STREAM)
        return {
            "publish": {
                "allow": [
                    *_stream_info(*streams),
                    *(f"{API}.STREAM.CREATE.{s}" for s in streams),  # it creates the streams; no one else may
                    *(f"{API}.STREAM.UPDATE.{s}" for s in streams),  # and brings an older one's subjects up to date
                    *_stream_reader(subjects.LOG_STREAM),
                    *_durable(subjects.FACTS_STREAM, STATEMACHINE_CONSUMER),
                    subjects.LOG_ALL,
                    f"{subjects.DEADLETTER}.{STATEMACHINE_CONSUMER}.*",
                    subjects.AUDIT_ALL,
                    *_objects(subjects.SNAPSHOTS_BUCKET, subjects.SNAPSHOTS_STREAM),
                    *_lease(subjects.SNAPSHOT_LEASE),  # one state machine writes the snapshot at a time
                    *_hosts_reader(),  # it places sandboxes on the hosts announced
                    f"{API}.STREAM.CREATE.{subjects.HOSTS_STREAM}",
                    inbox,  # its own: bus.natsinternals.settle
                ],
                "deny": protected,
            },
            "subscribe": {"allow": [subjects.COMMANDS_ALL, inbox, subjects.HEALTH]},
            "allow_responses": True,
        }
    if component == "projector":
        return {
            "publish": {
                "allow": [
                    *_stream_info(*CORE_STREAMS),
                    *_stream_reader(subjects.LOG_STREAM),
                    f"{subjects.PROJECTED}.*",
                    *_objects(subjects.PROJECTIONS_BUCKET, subjects.PROJECTIONS_STREAM),
                    *_lease(subjects.PROJECTION_SNAPSHOT_LEASE),  # one projector writes the snapshot at a time
                    subjects.INBOXES_ALL,
                ],
                "deny": protected,
            },
            "subscribe": {"allow": [inbox, subjects.HEALTH]},
        }
    if component == "reaper":
        return {
            "publish": {
                "allow": [
                    *_stream_info(*CORE_STREAMS),
                    *_stream_reader(subjects.LOG_STREAM),  # it folds the log for its deadlines
                    subjects.command("*", component_user(component)),
                    *_lease(subjects.REAPER_LEASE),  # one reaper acts at a time
                    subjects.INBOXES_ALL,
                ],
                "deny": protected,
            },
            "subscribe": {"allow": [inbox, subjects.HEALTH]},
        }
    if component == "webhooks":
        return {
            "publish": {
                "allow": [
                    *_stream_info(*CORE_STREAMS),
                    *_stream_reader(subjects.LOG_STREAM),  # a late webhook is caught up from the log
                    *_durable(subjects.LOG_STREAM, subjects.RELAY_CONSUMER),
                    *_webhooks(f"{subjects.JOINED_PREFIX}*"),  # it reads every webhook, writes its own marks
                    f"{subjects.DEADLETTER}.{subjects.RELAY_CONSUMER}.*",
                    subjects.INBOXES_ALL,
                ],
                "deny": protected,
            },
            "subscribe": {"allow": [inbox, subjects.HEALTH]},
        }
    if component == "console":
        # The web console acts as each signed-in user, on that user's own connection; its own
        # user only answers health requests (``serve --only console``) and reads the log's head.
        return {
            "publish": {"allow": [*_stream_info(subjects.LOG_STREAM), subjects.INBOXES_ALL], "deny": protected},
            "subscribe": {"allow": [inbox, subjects.HEALTH]},
        }
    if component == "query":
        return {
            # It answers through allow_responses, and reads a sandbox's history from the log.
            "publish": {
                "allow": [*_stream_reader(subjects.LOG_STREAM), *_hosts_reader(), inbox],
                "deny": protected,
            },
            "subscribe": {"allow": [f"{subjects.QUERY}.*", inbox, subjects.HEALTH]},
            "allow_responses": True,
        }
    if component.startswith("driver-"):
        consumer = f"sandboxctl-{component}"  # services.worker.DriverWorker.consumer
        # Its durable is its host's (DriverWorker.durable). The workers ``up`` provisioned may take
        # over the sandboxes placed on no host (before hosts), reading the consumer of no host to
        # start where it had got to; another machine's (``host add``) may not. Its facts go on its
        # host's subjects alone, which the state machine checks against each sandbox's host.
        adopts = adopts_unplaced(user, component)
        hosts = [*_durable(subjects.LOG_STREAM, f"{consumer}-{host}"), *_host_announcer(host, adopts)] if host else []
        return {
            "publish": {
                "allow": [
                    *_stream_info(*CORE_STREAMS),
                    *_stream_reader(subjects.LOG_STREAM),  # reconciliation folds the whole log
                    *(_durable(subjects.LOG_STREAM, consumer) if adopts else []),
                    *hosts,
                    *_objects(subjects.WORKSPACES_BUCKET, subjects.WORKSPACES_STREAM),  # archive and restore
                    subjects.fact("*", host) if host else subjects.FACTS_ALL,
                    f"{subjects.DEADLETTER}.{consumer}.*",
                    subjects.INBOXES_ALL,
                ],
                "deny": protected,
            },
            "subscribe": {"allow": [inbox, subjects.HEALTH]},
        }
    raise ValueError(f"unknown component {component!r}")


def user_permissions(name: str, roles: Iterable[str], protected: list[str] = PROTECTED_CONSUMERS) -> dict[str, Any]:
    """A person's (or another service's) permissions: its own command subjects whatever its roles
    (the state machine checks those, and records refusals), and streams by role. A reader may
    also ask every process for its services' health (``sandboxctl status``)."""
    roles = list(roles)
    publish = [subjects.command("*", name)]
    subscribe = [f"{subjects.inbox_prefix(name)}.>"]
    sub_deny: list[str] = []
    if has_role(roles, READ):
        publish += [f"{subjects.QUERY}.*", *_stream_reader(subjects.LOG_STREAM), subjects.HEALTH, *_hosts_reader()]
        subscribe += [f"{subjects.PROJECTED}.*"]
    if has_role(roles, ADMIN):
        publish += [*_stream_reader(subjects.DEADLETTER_STREAM), *_stream_reader(subjects.AUDIT_STREAM)]
        publish += [f"$KV.{subjects.HOSTS_BUCKET}.{DRAIN_PREFIX}*"]  # sandboxctl host drain and undrain
        publish += _webhooks(">")  # sandboxctl webhook: the webhooks and their secrets are an admin's
        # `sandboxctl top` counts commands; joining the state machine's queue group would steal them.
        subscribe += [subjects.COMMANDS_ALL]
        sub_deny += [f"{subjects.COMMANDS_ALL} sandboxctl-statemachine"]
    perms: dict[str, Any] = {
        "publish": {"allow": publish, "deny": protected},
        "subscribe": {"allow": subscribe},
    }
    if sub_deny:
        perms["subscribe"]["deny"] = sub_deny
    return perms


def permissions(user: User, protected: list[str] = PROTECTED_CONSUMERS) -> dict[str, Any]:
    if user.component:
        return component_permissions(user.component, user.host, protected, user.name)
    return user_permissions(user.name, user.roles, protected)


def server_conf(users: Iterable[User]) -> str:
    """The nats-server ``authorization`` block (NATS config accepts JSON values)."""
    users = list(users)
    protected = protected_consumers({u.host for u in users if u.host})
    entries = [{"user": u.name, "password": u.password, "permissions": permissions(u, protected)} for u in users]
    return "authorization " + msgspec.json.format(msgspec.json.encode({"users": entries}).decode()) + "\n"
