"""Reading manifest files: YAML into the typed models of `manifest.py`, relative paths against the
manifest's folder, and every validation error as one line naming the file and the field
(`data_manifest.yaml: datasets[0].shots: expected an integer >= 1, got 0`), raised before anything
is written. Also the manifest's JSON Schema, for editors (`shipyard manifest schema`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ManifestError
from .manifest import Manifest


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of a manifest file, for editors and validators."""
    schema = Manifest.model_json_schema()
    schema["properties"].pop("path", None)
    schema["title"] = "shipyard manifest"
    return schema


def load_manifest(path: Path | str, store_override: str | None = None) -> Manifest:
    """Read and validate a manifest; relative paths resolve against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(f"{path}: not valid YAML ({first})") from None
    return parse_manifest(data, path, store_override)


def parse_manifest(data: Any, path: Path, store_override: str | None = None) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping of manifest fields, got "
                            f"{type(data).__name__}")
    data = {**data, "path": path}
    if store_override:
        data["store"] = store_override
    try:
        return Manifest.model_validate(data, context={"base": path.resolve().parent})
    except ValidationError as exc:
        raise ManifestError(f"{path}: {describe(exc.errors()[0])}") from None


def describe(error: Any) -> str:
    """One pydantic error as `field.path: what is wrong, got value`."""
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "missing":
        return f"{loc}: missing required field"
    if kind == "extra_forbidden":
        return f"{loc}: unknown field"
    if kind == "enum":
        names = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"{loc}: unknown value {value!r} (expected one of: {', '.join(names)})"
    if kind.startswith("int_") or (kind == "greater_than_equal" and isinstance(value, int)):
        floor = f" >= {ctx['ge']}" if "ge" in ctx else ""
        return f"{loc}: expected an integer{floor}, got {value!r}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind != "value_error":
        return f"{loc}: {message[0].lower()}{message[1:]}, got {value!r}"
    if message.startswith("["):  # a list item: its index joins the field path
        item, _, message = message.partition("] ")
        loc += item + "]"
    elif message.startswith("split_file: "):  # a cross-field rule of a dataset
        loc, message = f"{loc}.split_file", message.removeprefix("split_file: ")
    return f"{loc}: {message}" if loc else message
