"""What every stage declares: its name, version, inputs, parameters and outputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int  # bump when the stage's outputs change meaning; part of every output key
    inputs: tuple[str, ...]  # what it reads: manifest sections or store paths
    params: tuple[str, ...]  # manifest fields and options that go into its output keys
    outputs: tuple[str, ...]  # store paths it writes
    summary: str
