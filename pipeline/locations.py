"""Where a store lives and who may write it: local folders and fsspec URLs, zarr store objects,
the writer lock beside local stores, and the sweep of a killed writer's temporary files."""

from __future__ import annotations

import os
import re
from contextlib import suppress
from pathlib import Path
from typing import Any

from .errors import StoreError, StoreLockedError


def is_url(location: str) -> bool:
    """True for fsspec URLs such as s3://bucket/x.zarr (a Windows drive letter is not a URL)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", location) is not None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def zarr_store(location: str, read_only: bool, options: dict[str, Any] | None) -> Any:
    import zarr.storage  # here, not at import: `--help` and manifest checks never need zarr

    if is_url(location):
        if location.startswith("file://"):
            return zarr.storage.LocalStore(location.removeprefix("file://"), read_only=read_only)
        try:
            return zarr.storage.FsspecStore.from_url(location, read_only=read_only,
                                                     storage_options=options or {})
        except ImportError as exc:
            raise StoreError(f"{location}: the fsspec backend is not installed ({exc}); "
                             "for s3:// install shipyard[s3]") from None
    return zarr.storage.LocalStore(location, read_only=read_only)


def store_exists(location: str, options: dict[str, Any] | None) -> bool:
    if is_url(location) and not location.startswith("file://"):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(location, **(options or {}))
            return bool(fs.exists(f"{path.rstrip('/')}/zarr.json"))
        except ImportError as exc:
            raise StoreError(f"{location}: the fsspec backend is not installed ({exc}); "
                             "for s3:// install shipyard[s3]") from None
    return (Path(location.removeprefix("file://")) / "zarr.json").is_file()


def sweep_partials(location: str) -> None:
    """Remove the temporary files of metadata writes a killed writer left in group folders.
    Safe only under the writer lock; chunk folders (`c/`) are not walked, so this stays cheap."""
    if is_url(location) and not location.startswith("file://"):
        return
    root = Path(location.removeprefix("file://"))
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "c"]
        for name in files:
            if name.endswith(".partial"):
                with suppress(OSError):
                    os.remove(os.path.join(folder, name))


def take_lock(location: str) -> Any | None:
    """The writer's exclusive lock on `<store>.lock`, beside the store's real path: two writers of
    one store exclude each other whichever path (relative, absolute, through a symlink) they
    name it by. Object stores have no lock and rely on one writer."""
    from filelock import FileLock, Timeout

    if is_url(location) and not location.startswith("file://"):
        return None
    path = Path(location.removeprefix("file://")).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StoreLockedError(f"{location} is being written by another process "
                               f"(lock {path}.lock)") from None
    return lock


def release_lock(lock: Any | None) -> None:
    if lock is not None:
        with suppress(OSError):
            lock.release()


def refuse_links(root: Any, path: str) -> None:
    """Before a writer replaces `path` of a local store: refuse if it, or anything under it, is a
    symbolic link, or if it resolves outside the store. A writer never follows a link out."""
    base = getattr(getattr(root, "store", None), "root", None)  # a LocalStore's folder
    if base is None:
        return
    base = Path(base)
    target = base / path
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.resolve().is_relative_to(base.resolve()):
        raise StoreError(f"{target}: a symbolic link or a path outside the store; a writer "
                         "replaces nothing there (remove the link, then run `shipyard store verify`)")
    for folder, dirs, files in os.walk(target, followlinks=False):
        for name in dirs + files:
            if os.path.islink(os.path.join(folder, name)):
                raise StoreError(f"{os.path.join(folder, name)}: a symbolic link inside the store; "
                                 "a writer replaces nothing through it (remove the link)")
