"""SandboxClient's own rules, without a server: when a wait can end, and one error type and exit
status per code. The client against a nats-server is tests/integration/test_client.py, against
the whole plane on real engines tests/e2e/test_client.py."""

from __future__ import annotations

from sandboxctl.cli.main import EXIT_CODES
from sandboxctl.client import (
    ERRORS,
    EXIT_STATUS,
    ClientCode,
    FailedPrecondition,
    PhaseFailed,
    SandboxError,
    wait_verdict,
)
from sandboxctl.events.replies import ErrorCode
from sandboxctl.statemachine import Phase


def row(phase: Phase, seq: int, **fields: object) -> dict[str, object]:
    return {"name": "box", "phase": phase.value, "last_seq": seq, "last_error": "", **fields}


def test_a_wait_ends_when_its_phase_can_no_longer_come() -> None:
    """Every phase a wait can meet after its command (seq 10), for each phase a command waits for."""
    cases: list[tuple[Phase, Phase, bool | type[SandboxError]]] = [
        # waiting for Ready (create, start): on the way from Provisioning and Starting only
        (Phase.READY, Phase.READY, True),
        (Phase.READY, Phase.PROVISIONING, False),
        (Phase.READY, Phase.STARTING, False),
        (Phase.READY, Phase.ERROR, PhaseFailed),
        (Phase.READY, Phase.STOPPING, FailedPrecondition),
        (Phase.READY, Phase.STOPPED, FailedPrecondition),
        (Phase.READY, Phase.DELETING, FailedPrecondition),
        (Phase.READY, Phase.DELETED, FailedPrecondition),
        # waiting for Stopped: on the way from Stopping (a second stop keeps it there) only
        (Phase.STOPPED, Phase.STOPPED, True),
        (Phase.STOPPED, Phase.STOPPING, False),
        (Phase.STOPPED, Phase.ERROR, PhaseFailed),
        (Phase.STOPPED, Phase.STARTING, FailedPrecondition),
        (Phase.STOPPED, Phase.READY, FailedPrecondition),
        (Phase.STOPPED, Phase.DELETING, FailedPrecondition),
        (Phase.STOPPED, Phase.DELETED, FailedPrecondition),
        (Phase.STOPPED, Phase.PROVISIONING, FailedPrecondition),
        # waiting for Deleted: on the way from Deleting only
        (Phase.DELETED, Phase.DELETED, True),
        (Phase.DELETED, Phase.DELETING, False),
        (Phase.DELETED, Phase.ERROR, PhaseFailed),
        (Phase.DELETED, Phase.PROVISIONING, FailedPrecondition),  # unless the log shows it was deleted first
    ]
    for target, seen, expected in cases:
        verdict = wait_verdict("box", target, 10, row(seen, 11))
        if isinstance(expected, bool):
            assert verdict is expected, (target, seen, verdict)
        else:
            assert isinstance(verdict, expected), (target, seen, verdict)
            named = f"sandbox box is {seen}" if seen is Phase.ERROR else f"sandbox box is {seen} (log seq 11"
            assert verdict.message.startswith(named), verdict.message
            assert seen is Phase.ERROR or f"so it will not become {target}" in verdict.message, verdict.message
    # A row from before the command, at the point named (a start by hand may follow a Stopped
    # sandbox's own event), or no row yet, or no position given: keep waiting.
    assert wait_verdict("box", Phase.READY, 10, row(Phase.STOPPED, 9)) is False
    assert wait_verdict("box", Phase.READY, 10, row(Phase.STOPPED, 10)) is False
    assert wait_verdict("box", Phase.READY, 10, None) is False
    assert wait_verdict("box", Phase.READY, 0, row(Phase.STOPPED, 9)) is False
    assert wait_verdict("box", Phase.READY, 0, row(Phase.DELETED, 9)) is False
    assert isinstance(wait_verdict("box", Phase.READY, 0, row(Phase.ERROR, 9, last_error="x")), PhaseFailed)


def test_every_error_code_has_its_type_and_its_own_exit_status() -> None:
    """One table: each code a service (ErrorCode) or the client (ClientCode) reports has an exception
    type and an exit status, and the CLI's table is that one."""
    codes = {str(c) for c in ErrorCode} | {str(c) for c in ClientCode}
    assert codes == set(EXIT_STATUS) == {cls.code for cls in ERRORS}
    assert len(set(EXIT_STATUS.values())) == len(EXIT_STATUS) and 0 not in EXIT_STATUS.values()
    assert EXIT_CODES == {**EXIT_STATUS, "broken_pipe": 141}  # the CLI's own code beside the client's
    for code in codes:
        error = SandboxError.of(code, "m")
        assert error.code == code and type(error).exit_status == EXIT_STATUS[code]
