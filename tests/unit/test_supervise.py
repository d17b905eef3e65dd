"""The restart policy of supervision, without a server: ``up`` never gives up, ``serve`` gives up
after its limit. Supervision at work is tests/integration/test_supervise.py and tests/e2e/test_supervise.py."""

from __future__ import annotations

from sandboxctl.runtime.config import Config


def test_up_never_gives_up_and_serve_leaves_it_to_its_outer_supervisor() -> None:
    """`up` has nothing above it: a cause that lasts (a disk full for minutes) must not end it.
    `serve` gives up after the limit, for systemd or a container runtime to start it clean."""
    from sandboxctl.runtime.supervise import RESTART_LIMIT, RestartPolicy

    forever = RestartPolicy(limit=0)
    delays = [forever.failed(now=float(i)) for i in range(200)]
    assert None not in delays and max(d for d in delays if d is not None) == forever.cap
    limited = RestartPolicy(limit=RESTART_LIMIT)
    assert [limited.failed(now=float(i)) is None for i in range(RESTART_LIMIT + 1)] == [False] * RESTART_LIMIT + [True]
    assert Config().restarts_allowed == RESTART_LIMIT
