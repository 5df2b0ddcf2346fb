"""The exceptions shipyard raises. The CLI maps each family to an exit code and one clear line."""

from __future__ import annotations

import errno
from typing import Any


class ShipyardError(Exception):
    """Base class: a failure shipyard can explain in one line."""

    exit_code = 1


class UsageError(ShipyardError):
    """The request itself is wrong (bad option combination, unknown name). Nothing was written."""

    exit_code = 2


class ManifestError(UsageError):
    """The manifest is missing, unparsable or invalid. Raised before anything is written."""


class StoreError(ShipyardError):
    """The feature store is missing, damaged or not what the caller expected."""


class StoreMissingError(StoreError):
    """There is no shipyard store at the location (yet)."""


class StoreReadOnlyError(StoreError):
    """A write was attempted on a store opened read-only."""


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock."""


class StoreWriteDeniedError(StoreError):
    """The store refused a write (permissions, read-only credentials) after some jobs had run.
    `results` are theirs, committed before the refusal; `summary`, once a command has made one
    of them, is what it prints before the error line."""

    def __init__(self, message: str, results: list[Any] | None = None) -> None:
        super().__init__(message)
        self.results = results or []
        self.summary: dict[str, Any] | None = None


class ExtractorMismatchError(StoreError):
    """Features were asked of an extractor the store does not hold, or of the wrong one."""


class ModelLoadError(ShipyardError):
    """The CLIP model or its weights could not be loaded."""


class ImageRootError(ShipyardError):
    """An image root on object storage cannot be reached, listed or read (exit 1: the manifest
    may be right and the bucket down)."""


class ImageError(ShipyardError):
    """An image could not be read or decoded (reported per image, fatal only with --strict)."""


DENIED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def is_denied(exc: BaseException) -> bool:
    """A refused write: a permission error (S3's AccessDenied comes as one through s3fs), or an
    OS error saying access is denied or the file system is read-only."""
    return isinstance(exc, PermissionError) or (
        isinstance(exc, OSError) and exc.errno in DENIED_ERRNOS)
