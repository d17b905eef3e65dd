"""The one static transitions Machine that defines every legal phase change.

It is built once with ``model=None`` and never bound to sandboxes: the log is
folded, never replayed through triggers. Its transition table is read into a
plain dict so ``evolve`` costs one lookup per event.
"""

from __future__ import annotations

from transitions import Machine

from sandboxctl.statemachine.phases import ABSENT, Phase

_ALIVE = [p.value for p in Phase if p is not Phase.DELETED]

MACHINE = Machine(
    model=None,
    states=[ABSENT, *[p.value for p in Phase]],
    initial=ABSENT,
    auto_transitions=False,
    transitions=[
        {"trigger": "create", "source": [ABSENT, Phase.DELETED.value], "dest": Phase.PROVISIONING.value},
        # From Stopping too: a second stop whose grace ends sooner (statemachine.decider.decide).
        # From Paused too: the engine thaws it to stop it.
        {
            "trigger": "request_stop",
            "source": [Phase.READY.value, Phase.PAUSED.value, Phase.STOPPING.value],
            "dest": Phase.STOPPING.value,
        },
        {"trigger": "request_pause", "source": Phase.READY.value, "dest": Phase.PAUSING.value},
        # From Ready too: a pause made outside sandboxctl.
        {"trigger": "paused", "source": [Phase.PAUSING.value, Phase.READY.value], "dest": Phase.PAUSED.value},
        {"trigger": "request_resume", "source": Phase.PAUSED.value, "dest": Phase.RESUMING.value},
        {"trigger": "request_archive", "source": Phase.STOPPED.value, "dest": Phase.ARCHIVING.value},
        # From Error too: an archive the worker finished after the deadline had failed it.
        {"trigger": "archived", "source": [Phase.ARCHIVING.value, Phase.ERROR.value], "dest": Phase.ARCHIVED.value},
        # From Error too: a stop the engine carried out after sandboxctl had given up on it (a
        # timeout, an engine that went away mid-call) is reported late, and is still a stop.
        {"trigger": "stopped", "source": [Phase.STOPPING.value, Phase.ERROR.value], "dest": Phase.STOPPED.value},
        {
            "trigger": "request_start",
            "source": [Phase.STOPPED.value, Phase.COMPLETED.value, Phase.ARCHIVED.value, Phase.ERROR.value],
            "dest": Phase.STARTING.value,
        },
        # A job's main process exited 0 on its own (a stop's exit is "stopped", whatever its code).
        {
            "trigger": "complete",
            "source": [Phase.PROVISIONING.value, Phase.STARTING.value, Phase.READY.value],
            "dest": Phase.COMPLETED.value,
        },
        # Ready from Stopped, Completed or Error is a start made outside sandboxctl; Ready
        # from Ready records a new incarnation of a container that restarted. From Resuming it is
        # the resume done; from Paused or Pausing, a thaw (or a restart) made outside.
        {
            "trigger": "ready",
            "source": [
                Phase.PROVISIONING.value,
                Phase.STARTING.value,
                Phase.STOPPED.value,
                Phase.COMPLETED.value,
                Phase.ERROR.value,
                Phase.READY.value,
                Phase.PAUSING.value,
                Phase.PAUSED.value,
                Phase.RESUMING.value,
            ],
            "dest": Phase.READY.value,
        },
        {"trigger": "fail", "source": _ALIVE, "dest": Phase.ERROR.value},
        {"trigger": "request_delete", "source": _ALIVE, "dest": Phase.DELETING.value},
        {"trigger": "deleted", "source": Phase.DELETING.value, "dest": Phase.DELETED.value},
        # Use, leases, holds and the reaper's warnings are recorded in any live phase and keep it.
        {"trigger": "note", "source": _ALIVE, "dest": "="},
    ],
)


class IllegalTransition(ValueError):
    pass


TABLE: dict[tuple[str, str], str] = {
    (trigger, source): transition.dest
    for trigger, event in MACHINE.events.items()
    for source, transitions in event.transitions.items()
    for transition in transitions
    if transition.dest is not None
}


# The same table with the destination as a Phase, so a fold never builds one from its name.
_DESTINATIONS: dict[tuple[str, str], Phase] = {key: Phase(dest) for key, dest in TABLE.items()}


def destination(trigger: str, source: str) -> Phase:
    try:
        return _DESTINATIONS[(trigger, source)]
    except KeyError:
        raise IllegalTransition(f"{trigger!r} is not allowed from {source}") from None


def allowed_sources(trigger: str) -> list[str]:
    return [s for (t, s) in TABLE if t == trigger and s != ABSENT]
