"""Progress of sandboxes on their way to a phase, for the people watching a terminal.

On a terminal (stderr is one, and TERM is not ``dumb``), a command that waits shows a progress
bar of the sandboxes that got there (rich's), and above it each sandbox's phase as it moves
(``demo: Stopping``, ``demo: Stopped``). Anywhere else it shows nothing: what a pipe or a
file gets is the command's own plain lines, the same with or without a terminal. rich is
imported only for a terminal: a script's call pays nothing for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandboxctl.client import SandboxClient
    from sandboxctl.statemachine.phases import Phase


def on_terminal(stream: IO[str]) -> bool:
    return stream.isatty() and os.environ.get("TERM", "") != "dumb"


class Progress:
    """``total`` sandboxes going to their phase for ``verb``: ``wait`` for each (it shows each
    phase the sandbox passes through), ``done`` as each gets there or fails; the bar ends with
    the ``with`` block."""

    def __init__(self, verb: str, total: int, stream: IO[str] | None = None) -> None:
        stream = sys.stderr if stream is None else stream
        self._bar: Any = None
        self._seen: dict[str, str] = {}
        if total < 1 or not on_terminal(stream):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=stream, highlight=False),
        )
        self._task = self._bar.add_task(verb, total=total)
        self._bar.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.end()

    async def wait(
        self, client: SandboxClient, name: str, target: Phase, after_seq: int, timeout: float
    ) -> dict[str, Any]:
        """``client.wait_for`` the sandbox's ``target``, each row looked at on the way shown; said
        done once the projection has committed it too, so that a command that follows, in another
        process (which has seen nothing yet), reads it: the wait ends on the projector's notice,
        sent while its row commits, and a get asks for at least what the wait saw."""
        from sandboxctl.client.errors import NotFound

        row = await client.wait_for(
            name, target, after_seq, timeout, on_change=lambda row: self.moved(name, str(row.get("phase", "")))
        )
        with contextlib.suppress(NotFound):  # a wait for Deleted: the row may be gone already
            await client.get(name)
        return row

    def moved(self, name: str, phase: str) -> None:
        """``name`` is in ``phase`` now (said once per phase it passes through)."""
        if self._bar is None or self._seen.get(name) == phase:
            return
        self._seen[name] = phase
        self._bar.console.print(f"{name}: {phase}", markup=False)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
