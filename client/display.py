"""How `dreambooth submit` and `dreambooth jobs follow` show a job: a panel redrawn in place on a
terminal, one plain line per change anywhere else (pipes, CI logs, `tee`)."""
from __future__ import annotations

import sys
import time
from typing import IO, Protocol

from .status import JobStatus, change_key, panel_lines, plain_line


class Display(Protocol):
    def update(self, status: JobStatus) -> None: ...
    def note(self, text: str) -> None: ...
    def samples(self, count: int, latest: str | None) -> None: ...
    def close(self) -> None: ...


class PlainDisplay:
    """A line when something changed (phase, step, restarts, serving), and one per note."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.last: tuple | None = None

    def update(self, status: JobStatus) -> None:
        key = change_key(status)
        if key != self.last:
            self.last = key
            self._print(plain_line(status))

    def note(self, text: str) -> None:
        self._print(f"{time.strftime('%H:%M:%S')}  {text}")

    def samples(self, count: int, latest: str | None) -> None:
        pass  # each sample already got its own note

    def close(self) -> None:
        self.stream.flush()

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


class LiveDisplay:
    """A few lines redrawn in place (rich.live); notes scroll above them."""

    def __init__(self, samples_dir: str | None = None) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self.console = Console()
        self.started = time.monotonic()
        self.samples_dir = samples_dir
        self.count, self.latest = 0, None
        self.status: JobStatus | None = None
        self.live = Live(Text("connecting..."), console=self.console, auto_refresh=False, transient=False)
        self.live.start()

    def update(self, status: JobStatus) -> None:
        self.status = status
        self._draw()

    def samples(self, count: int, latest: str | None) -> None:
        self.count, self.latest = count, latest
        self._draw()

    def note(self, text: str) -> None:
        self.live.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self._draw()
        self.live.stop()

    def _draw(self) -> None:
        from rich.text import Text

        if self.status is None:
            return
        lines = panel_lines(self.status, time.monotonic() - self.started, self.count, self.samples_dir, self.latest)
        self.live.update(Text("\n".join(lines)), refresh=True)


def display_for(stream: IO[str], samples_dir: str | None, force_plain: bool = False) -> Display:
    """The live panel on a terminal, plain lines otherwise."""
    if not force_plain and stream.isatty():
        return LiveDisplay(samples_dir)
    return PlainDisplay(stream)
