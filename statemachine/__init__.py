"""The pure core: sandbox phases, and the decider that drives them.

No I/O happens here. ``decide`` turns a command into events or a rejection,
``react`` turns a driver fact into events, and ``evolve`` folds one event into
state. Services at the edges feed these from NATS and append their results.
"""

from typing import TYPE_CHECKING

from sandboxctl import lazy_exports

if TYPE_CHECKING:
    from sandboxctl.statemachine.decider import BACKEND_MISSING, Decision, Rejection, decide, evolve, fold, react
    from sandboxctl.statemachine.machine import IllegalTransition, allowed_sources
    from sandboxctl.statemachine.names import validate_name
    from sandboxctl.statemachine.phases import Phase
    from sandboxctl.statemachine.state import SandboxState

__all__ = [
    "BACKEND_MISSING",
    "Decision",
    "IllegalTransition",
    "Phase",
    "Rejection",
    "SandboxState",
    "allowed_sources",
    "decide",
    "evolve",
    "fold",
    "react",
    "validate_name",
]

__getattr__, __dir__ = lazy_exports(__name__)
