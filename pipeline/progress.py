"""Progress reporting without printing: the library calls a `Progress`; the CLI decides how it
looks (a bar on stderr), tests and library users get silence by default."""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None, unit: str) -> Task: ...


class _SilentTask:
    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class Silent:
    """The default Progress: reports nothing."""

    def task(self, description: str, total: int | None, unit: str) -> Task:
        return _SilentTask()
