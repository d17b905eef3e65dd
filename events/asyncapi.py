"""The machine-readable contract: an AsyncAPI 3 document built from the msgspec types.

Generated, never hand-edited, so it cannot drift from what the services
accept and emit; tests/unit/test_contract_doc.py fails when docs/asyncapi.json
differs from what this module builds. Regenerate with
``python -m sandboxctl.events.asyncapi``.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from sandboxctl.events import subjects
from sandboxctl.events.commands import COMMAND_TYPES, BulkPage, BulkSandboxes
from sandboxctl.events.denied import DeniedAttempt
from sandboxctl.events.envelope import Envelope
from sandboxctl.events.facts import FACT_TYPES
from sandboxctl.events.health import ServiceHealth
from sandboxctl.events.hosts import DRAIN_PREFIX, HostAnnouncement
from sandboxctl.events.lifecycle import EVENT_TYPES
from sandboxctl.events.queries import QUERY_TYPES, HistoryPage, HostList, ListPage, Summary
from sandboxctl.events.replies import Reply

REF = "#/components/schemas/{name}"
REPLY = {"channel": {"$ref": "#/channels/reply"}, "messages": [{"$ref": "#/channels/reply/messages/Reply"}]}
DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"


def _asyncapi_schema(node: Any) -> Any:
    """msgspec writes OpenAPI's discriminator object; an AsyncAPI schema's discriminator is the property name.

    Descriptions come from docstrings, which msgspec 0.23 dedents and 0.22 does not: cleaned here,
    so the document does not depend on which msgspec generated it."""
    if isinstance(node, dict):
        out = {k: _asyncapi_schema(v) for k, v in node.items()}
        if isinstance(out.get("discriminator"), dict):
            out["discriminator"] = out["discriminator"]["propertyName"]
        if isinstance(out.get("description"), str):
            out["description"] = inspect.cleandoc(out["description"])
        return out
    if isinstance(node, list):
        return [_asyncapi_schema(v) for v in node]
    return node


def _doc(cls: type) -> str:
    """A command's own docstring, joined into one line, for its summary."""
    return " ".join((cls.__doc__ or "").split())


def _type_const(type_name: str) -> dict[str, Any]:
    return {"type": "string", "const": type_name}


def document() -> dict[str, Any]:
    commands: list[Any] = [*COMMAND_TYPES, BulkSandboxes]  # each a tagged Struct with a VERB
    events = list(EVENT_TYPES.values())
    facts = list(FACT_TYPES.values())
    queries = list(QUERY_TYPES.values())
    results = [ListPage, HistoryPage, Summary, HostList, BulkPage]
    _, schemas = msgspec.json.schema_components(
        [
            *commands,
            *events,
            *facts,
            Envelope,
            Reply,
            DeniedAttempt,
            HostAnnouncement,
            *queries,
            *results,
            ServiceHealth,
        ],
        ref_template=REF,
    )
    schemas = _asyncapi_schema(schemas)

    messages: dict[str, Any] = {}
    for cls in commands:
        tag = cls.__struct_config__.tag
        messages[cls.__name__] = {
            "name": cls.__name__,
            "title": f"{cls.VERB} command",
            "summary": f"{_doc(cls) or f'Ask sandboxctl to {cls.VERB} a sandbox.'} `type` must be {tag}.",
            "payload": {"$ref": REF.format(name=cls.__name__)},
        }
    upcast_only = {cls.TYPE for cls in events if hasattr(cls, "upcast")}
    enveloped: list[tuple[str, type]] = [("event", c) for c in events] + [("fact", c) for c in facts]
    for kind, cls in enveloped:
        type_name: str = cls.TYPE  # type: ignore[attr-defined]
        name = f"{cls.__name__}Envelope"
        schemas[name] = {
            "allOf": [{"$ref": REF.format(name="Envelope")}],
            "properties": {"type": _type_const(type_name), "data": {"$ref": REF.format(name=cls.__name__)}},
        }
        summary = "an old version: never written now, upcast on read" if type_name in upcast_only else f"a {kind}"
        messages[name] = {
            "name": type_name,
            "title": type_name,
            "summary": summary,
            "payload": {"$ref": REF.format(name=name)},
        }
    messages["Reply"] = {
        "name": "Reply",
        "summary": "Every reply: accepted with sandbox, phase and log seq, or an error with a code and a message.",
        "payload": {"$ref": REF.format(name="Reply")},
    }
    for query in queries:
        messages[query.__name__] = {
            "name": query.__name__,
            "summary": _doc(query),
            "payload": {"$ref": REF.format(name=query.__name__)},
        }
    for result in results:
        messages[result.__name__] = {
            "name": result.__name__,
            "summary": f"Reply.result of a query: {_doc(result) or result.__name__}",
            "payload": {"$ref": REF.format(name=result.__name__)},
        }
    schemas["HealthAnswer"] = {"type": "array", "items": {"$ref": REF.format(name="ServiceHealth")}}
    messages["HealthAnswer"] = {
        "name": "HealthAnswer",
        "summary": "Each process's answer on sandboxctl.health: one entry per service it runs.",
        "payload": {"$ref": REF.format(name="HealthAnswer")},
    }
    schemas["ProjectedNotice"] = {
        "type": "object",
        "required": ["name", "phase", "seq"],
        "properties": {"name": {"type": "string"}, "phase": {"type": "string"}, "seq": {"type": "integer"}},
    }
    messages["ProjectedNotice"] = {"name": "ProjectedNotice", "payload": {"$ref": REF.format(name="ProjectedNotice")}}
    messages["HostAnnouncement"] = {
        "name": "HostAnnouncement",
        "summary": _doc(HostAnnouncement),
        "payload": {"$ref": REF.format(name="HostAnnouncement")},
    }
    messages["DeniedAttempt"] = {
        "name": "DeniedAttempt",
        "summary": "A command refused with permission_denied: who, what, which sandbox, when, why.",
        "payload": {"$ref": REF.format(name="DeniedAttempt")},
    }

    name_param = {"name": {"description": "The sandbox name: 1-63 letters, digits, '-' or '_'."}}
    user_param = {
        "user": {"description": "The sender's NATS user name; the server lets each user publish only on its own."}
    }
    channels: dict[str, Any] = {
        "reply": {
            "address": None,
            "description": "The requester's inbox (NATS request/reply).",
            "messages": {"Reply": {"$ref": "#/components/messages/Reply"}},
        },
        "log": {
            "address": f"{subjects.LOG}.{{name}}",
            "description": f"JetStream stream {subjects.LOG_STREAM}: the lifecycle log, the source of truth.",
            "parameters": name_param,
            "messages": {
                f"{c.__name__}Envelope": {"$ref": f"#/components/messages/{c.__name__}Envelope"} for c in events
            },
        },
        "facts": {
            "address": f"{subjects.FACTS}.{{host}}.{{name}}",
            "description": f"JetStream stream {subjects.FACTS_STREAM}: what driver workers saw engines do, on the "
            "reporting host's subject (a worker of no host reports on sandboxctl.fact.{name}); the state machine "
            "believes a fact only from the sandbox's own host.",
            "parameters": {
                "host": {"description": "The reporting worker's host; NATS lets only that host's worker publish here."},
                **name_param,
            },
            "messages": {
                f"{c.__name__}Envelope": {"$ref": f"#/components/messages/{c.__name__}Envelope"} for c in facts
            },
        },
        "projected": {
            "address": f"{subjects.PROJECTED}.{{name}}",
            "description": "Core NATS: the projection committed a change to this sandbox.",
            "parameters": name_param,
            "messages": {"ProjectedNotice": {"$ref": "#/components/messages/ProjectedNotice"}},
        },
        "hosts": {
            "address": f"$KV.{subjects.HOSTS_BUCKET}.{{host}}",
            "description": f"JetStream key-value bucket {subjects.HOSTS_BUCKET}: each host's announcement, "
            "renewed by its driver workers' heartbeat; a host not renewed for its heartbeat window is lost. "
            f"Key {DRAIN_PREFIX}<host> (admin only) drains the host.",
            "parameters": {"host": {"description": "The host name: 1-63 letters, digits, '-' or '_'."}},
            "messages": {"HostAnnouncement": {"$ref": "#/components/messages/HostAnnouncement"}},
        },
        "audit": {
            "address": f"{subjects.AUDIT}.denied.{{user}}",
            "description": f"JetStream stream {subjects.AUDIT_STREAM} (authorization on): refused commands; "
            "admin only. The log never holds them.",
            "parameters": user_param,
            "messages": {"DeniedAttempt": {"$ref": "#/components/messages/DeniedAttempt"}},
        },
    }
    operations: dict[str, Any] = {}
    for cls in commands:
        channel = f"command-{cls.VERB}"
        channels[channel] = {
            "address": subjects.command(cls.VERB),
            "description": "Request/reply. Set the NATS header Nats-Msg-Id to command_id (optional; the "
            "service dedupes by command_id either way).",
            "messages": {cls.__name__: {"$ref": f"#/components/messages/{cls.__name__}"}},
        }
        operations[f"{cls.VERB}Sandbox"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{cls.__name__}"}],
            "reply": {
                "channel": {"$ref": "#/channels/reply"},
                "messages": [{"$ref": "#/channels/reply/messages/Reply"}],
            },
        }
    for cls in commands:
        channel = f"command-{cls.VERB}-as-user"
        channels[channel] = {
            "address": subjects.command(cls.VERB, "{user}"),
            "description": "With authorization on (docs/security.md), the only command subject: the last token "
            "is the sender's own NATS user, which becomes the events' actor; the payload's actor is ignored. "
            "The user needs the role sandbox:write, else the reply is permission_denied.",
            "parameters": user_param,
            "messages": {cls.__name__: {"$ref": f"#/components/messages/{cls.__name__}"}},
        }
        operations[f"{cls.VERB}SandboxAsUser"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{cls.__name__}"}],
            "reply": {
                "channel": {"$ref": "#/channels/reply"},
                "messages": [{"$ref": "#/channels/reply/messages/Reply"}],
            },
        }
    for kind, query in QUERY_TYPES.items():
        channel, message = f"query-{kind}", query.__name__
        channels[channel] = {
            "address": subjects.query(kind),
            "description": "Request/reply against the projection (history: against the log); the answer is in "
            "Reply.result. Replies go only to _INBOX. subjects.",
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        }
        operations[f"query{kind.capitalize()}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
            "reply": {
                "channel": {"$ref": "#/channels/reply"},
                "messages": [{"$ref": "#/channels/reply/messages/Reply"}],
            },
        }
    channels["health"] = {
        "address": subjects.HEALTH,
        "description": "Request (any payload) with an _INBOX. reply subject: every process that runs services "
        "answers with a HealthAnswer; gather the answers for a moment (sandboxctl status).",
        "messages": {"HealthAnswer": {"$ref": "#/components/messages/HealthAnswer"}},
    }
    operations["askHealth"] = {"action": "send", "channel": {"$ref": "#/channels/health"}}
    for channel in ("log", "facts", "projected", "hosts", "audit"):
        operations[f"read{channel.capitalize()}"] = {"action": "receive", "channel": {"$ref": f"#/channels/{channel}"}}

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "sandboxctl",
            "version": "0.1.0",
            "description": "Sandbox lifecycle commands, replies, the lifecycle log, driver facts and queries, "
            "all JSON over NATS. Generated from events/ by `python -m sandboxctl.events.asyncapi`.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    DOCUMENT.write_text(render())
    print(f"wrote {DOCUMENT}", file=sys.stderr)


if __name__ == "__main__":
    main()
