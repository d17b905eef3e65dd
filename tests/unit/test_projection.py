"""The projection's row formats: what a get returns and what a projected notice carries."""

from __future__ import annotations

import json

from sandboxctl.services.projection import (
    NOTICE_MAX,
    SANDBOX_COLUMNS,
    encoded_row,
    projected_notice,
    sandbox_row,
    stub_row,
)


def row(**overrides: object) -> tuple[object, ...]:
    values: dict[str, object] = {
        "name": "box-1",
        "sandbox_id": "0123456789abcdef",
        "phase": "Ready",
        "driver": "podman",
        "host": "host-a",
        "image": "localhost/sandboxctl-busybox:latest",
        "command": json.dumps(["sh", "-c", 'echo "hi" \u00e9']),
        "labels": json.dumps({"team": "red", "tier": "b"}, sort_keys=True),
        "resources": json.dumps({"cpus": 1.5, "memory": 536870912}),
        "env": json.dumps({"GREETING": "hi"}),
        "last_error": "",
        "incarnation": "2026-11-29T16:00:00Z",
        "created_at": "2026-11-29T15:59:00+00:00",
        "updated_at": "2026-11-29T16:00:01+00:00",
        "last_seq": 42,
        "idle_timeout": 600.0,
        "auto_delete_after": 0.0,
        "auto_archive_after": 604800.0,
        "archive": "",
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


def test_a_notice_of_a_row_too_large_to_carry_leaves_the_row_out() -> None:
    """A row past NOTICE_MAX (labels written outside the bounds) is announced without it, so the
    publish fits and the projector lives on; a waiter reads such a row with a get."""
    huge = row(labels=json.dumps({"blob": "x" * 900_000}))
    name, notice = projected_notice(huge)
    assert name == "box-1" and len(notice) < 200
    assert json.loads(notice) == {"name": "box-1", "phase": "Ready", "seq": 42}
    assert len(projected_notice(row(labels=json.dumps({"blob": "x" * (NOTICE_MAX - 2_000)})))[1]) <= NOTICE_MAX


def test_a_list_item_is_the_row_as_a_get_returns_it_and_a_stub_is_bounded() -> None:
    for r in (row(), row(command=None, warning=None, leases="[]", holds="[]", labels="{}")):
        assert json.loads(encoded_row(r)) == sandbox_row(r)
    stub = json.loads(stub_row(row(labels=json.dumps({"blob": "x" * 900_000}))))
    assert stub == {
        "name": "box-1", "sandbox_id": "0123456789abcdef", "phase": "Ready", "driver": "podman", "host": "host-a",
        "last_seq": 42,
        "updated_at": "2026-11-29T16:00:01+00:00", "truncated": True,
    }  # fmt: skip
