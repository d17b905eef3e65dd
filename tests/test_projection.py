"""The projection's row formats: what a get returns and what a projected notice carries."""

from __future__ import annotations

import json

from services.projection import SANDBOX_COLUMNS, projected_notice, sandbox_row


def row(**overrides: object) -> tuple[object, ...]:
    values: dict[str, object] = {
        "name": "box-1",
        "sandbox_id": "0123456789abcdef",
        "phase": "Ready",
        "driver": "podman",
        "image": "localhost/sandboxctl-busybox:latest",
        "command": json.dumps(["sh", "-c", 'echo "hi" \u00e9']),
        "labels": json.dumps({"team": "red", "tier": "b"}, sort_keys=True),
        "last_error": "",
        "incarnation": "2026-11-29T16:00:00Z",
        "created_at": "2026-11-29T15:59:00+00:00",
        "updated_at": "2026-11-29T16:00:01+00:00",
        "last_seq": 42,
        "idle_timeout": 600.0,
        "auto_delete_after": 0.0,
        "last_activity": "2026-11-29T16:00:01+00:00",
        "activity_seq": 41,
        "leases": json.dumps([{"holder": "agent-7", "expires": "2026-11-29T16:10:00+00:00"}]),
        "holds": json.dumps([{"holder": "ops", "reason": "debugging"}]),
        "warning": json.dumps({"kind": "idle", "activity_seq": 41, "deadline": "x", "grace": 60.0}),
    }
    values.update(overrides)
    return tuple(values[c] for c in SANDBOX_COLUMNS)


def test_a_notice_carries_the_row_as_a_get_returns_it() -> None:
    for r in (row(), row(command=None, warning=None, leases="[]", holds="[]", labels="{}")):
        name, notice = projected_notice(r)
        decoded = json.loads(notice)
        assert name == "box-1"
        assert decoded == {"name": "box-1", "phase": "Ready", "seq": 42, "item": sandbox_row(r)}
