"""Content keys: the sha256 of canonical JSON, the one way every artefact in the store is named."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values always give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(obj: Any) -> str:
    """sha256 hex digest of `canonical_json(obj)`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def short(fp: str, n: int = 12) -> str:
    """Abbreviated fingerprint for people; the store always uses the full one."""
    return fp[:n]
