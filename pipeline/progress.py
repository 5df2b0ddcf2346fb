"""Progress reporting without printing: the library calls a `Progress`; the CLI decides how it
looks (a bar on a terminal, `LogProgress` records when stderr is a file or a pipe), tests and
library users get silence by default."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None, unit: str) -> Task: ...


class SilentTask:
    """A task that reports nothing (what `Silent` hands out; a base for recording tasks)."""

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class Silent:
    """The default Progress: reports nothing."""

    def task(self, description: str, total: int | None, unit: str) -> Task:
        return SilentTask()


class LogProgress:
    """One-line progress records on a stream, for logs: every `interval` seconds while a task is
    open, whether or not it advanced since the last record, so a long run never looks dead.

        progress: encode images 512/1000 img (51%), 42.3 img/s, eta 12 s

    A task that ends within `interval` writes nothing."""

    def __init__(self, stream: TextIO, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError(f"progress interval must be > 0 seconds, got {interval}")
        self.stream, self.interval, self.clock = stream, interval, clock
        self._lock = threading.Lock()  # one record at a time when tasks overlap

    def task(self, description: str, total: int | None, unit: str) -> Task:
        return _LogTask(self, description, total, unit)

    def write(self, line: str) -> None:
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class _LogTask:
    def __init__(self, owner: LogProgress, description: str, total: int | None, unit: str) -> None:
        self.owner, self.description, self.total, self.unit = owner, description, total, unit
        self.done, self.text = 0, ""
        self.start = owner.clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="shipyard-progress", daemon=True)
        self._thread.start()

    def advance(self, n: int = 1) -> None:
        self.done += n

    def note(self, text: str) -> None:
        self.text = text

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.owner.interval):
            self.owner.write(self.line())

    def line(self) -> str:
        """The record as of now: stage, done/total, rate and ETA (when the total is known)."""
        elapsed = max(self.owner.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"progress: {self.description} {self.done}"
                 + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done // self.total}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total is not None and rate > 0:
            parts.append(f"eta {max(0.0, (self.total - self.done) / rate):.0f} s")
        elif self.total is not None:
            parts.append("eta unknown")
        parts.append(f"{elapsed:.0f} s elapsed")
        return ", ".join(parts) + (f" [{self.text}]" if self.text else "")
