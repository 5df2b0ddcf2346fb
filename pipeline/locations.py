"""Where a store lives and who may write it: local folders and fsspec URLs, zarr store objects,
the writer lock beside every store (a file lock beside a local one, a lock object created by a
conditional write beside one on object storage), and the sweep of a killed writer's temporary
files."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import socket
from contextlib import suppress
from pathlib import Path
from typing import Any

from .errors import StoreError, StoreLockedError, StoreMissingError

LOCK_SUFFIX = ".lock"
# Object stores whose fsspec backend creates an object atomically only if it does not exist
# (s3fs: PutObject with If-None-Match: *). Any other backend is never written.
CONDITIONAL_PROTOCOLS = {"s3", "s3a"}


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
    if is_object_store(location):
        fs, path = _object_fs(location, options)
        return bool(fs.exists(f"{path}/zarr.json"))
    return (Path(location.removeprefix("file://")) / "zarr.json").is_file()


def sweep_partials(location: str, remove: bool = True) -> list[tuple[str, int]]:
    """The temporary files of metadata writes a killed writer left in group folders, as (path in
    the store, bytes), removed unless `remove` is False (what `store gc --dry-run` lists). Safe
    only under the writer lock; chunk folders (`c/`) are not walked, so this stays cheap."""
    if is_object_store(location):
        return []
    root = Path(location.removeprefix("file://"))
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "c"]
        for name in files:
            if name.endswith(".partial"):
                path = os.path.join(folder, name)
                with suppress(OSError):
                    size = os.path.getsize(path)
                    if remove:
                        os.remove(path)
                    found.append((Path(path).relative_to(root).as_posix(), size))
    return sorted(found)


def stored_objects(location: str, options: dict[str, Any] | None,
                   prefix: str) -> dict[str, tuple[int, float]]:
    """Every stored object (file) under `prefix` of a store: path in the store -> (bytes,
    modification time as a POSIX timestamp). What `store gc` sizes and dates its removals by."""
    out: dict[str, tuple[int, float]] = {}
    if is_object_store(location):
        fs, path = _object_fs(location, options)
        base = f"{path}/{prefix}".rstrip("/")
        for name, info in fs.find(base, detail=True).items():
            when = info.get("LastModified") or info.get("mtime") or 0
            stamp = when.timestamp() if isinstance(when, dt.datetime) else float(when)
            out[name[len(path) + 1:]] = (int(info.get("size") or 0), stamp)
        return out
    root = Path(location.removeprefix("file://"))
    top = root / prefix
    if top.is_file():
        st = top.stat()
        return {prefix: (st.st_size, st.st_mtime)}
    for folder, _dirs, files in os.walk(top):
        for name in files:
            full = os.path.join(folder, name)
            with suppress(OSError):
                st = os.stat(full)
                out[Path(full).relative_to(root).as_posix()] = (st.st_size, st.st_mtime)
    return out


def is_object_store(location: str) -> bool:
    return is_url(location) and not location.startswith("file://")


def lock_location(location: str) -> str:
    """Where a store's writer lock lives: `<store>.lock` beside it."""
    return location.rstrip("/") + LOCK_SUFFIX


def take_lock(location: str, options: dict[str, Any] | None = None) -> Any:
    """The writer's exclusive lock. Beside a local store, `<store>.lock` held with an OS file lock,
    beside the store's real path: two writers of one store exclude each other whichever path
    (relative, absolute, through a symlink) they name it by, and a killed writer's lock dies with
    it. Beside a store on object storage, the lock object `<store>.lock` (`ObjectLock`)."""
    from filelock import FileLock, Timeout

    if is_object_store(location):
        return ObjectLock.take(location, options)
    path = Path(location.removeprefix("file://")).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}{LOCK_SUFFIX}", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StoreLockedError(f"{location} is being written by another process "
                               f"(lock {path}{LOCK_SUFFIX})") from None
    return lock


def release_lock(lock: Any | None) -> None:
    if lock is not None:
        with suppress(OSError):
            lock.release()


def _object_fs(location: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(location, **(options or {}))
    except ImportError as exc:
        raise StoreError(f"{location}: the fsspec backend is not installed ({exc}); "
                         "for s3:// install shipyard[s3]") from None
    return fs, str(path).rstrip("/")


def _protocols(fs: Any) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


class ObjectLock:
    """The writer lock of a store on object storage: the object `<store>.lock` beside it, created
    by a conditional write (S3's `If-None-Match: *`) that fails when the object exists, so of two
    writers exactly one creates it. It names its holder, and the holder deletes it on closing.
    A writer killed while holding it leaves it behind: `shipyard store unlock` removes it."""

    def __init__(self, fs: Any, path: str, token: str) -> None:
        self.fs, self.path, self.token = fs, path, token

    @classmethod
    def take(cls, location: str, options: dict[str, Any] | None) -> ObjectLock:
        fs, path = _object_fs(location, options)
        url, lock_path = lock_location(location), path + LOCK_SUFFIX
        if not _protocols(fs) & CONDITIONAL_PROTOCOLS:
            raise StoreError(f"{location}: no writer lock can be taken on "
                             f"{sorted(_protocols(fs))[0]}:// (shipyard writes object stores only "
                             "where a conditional write keeps a second writer out: s3://); open it "
                             "read-only or write a local store")
        since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        token = secrets.token_hex(8)
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since,
                           "token": token}).encode()
        try:
            fs.pipe_file(lock_path, body, mode="create")
        except FileExistsError:
            raise StoreLockedError(_held(location, url, read_holder(fs, lock_path))) from None
        except Exception as exc:  # denied, unreachable: one line
            raise StoreError(f"{location}: cannot take the writer lock {url}: "
                             f"{first_line(exc)}") from None
        # A backend that ignores the condition would let a second writer in: it must refuse this.
        try:
            fs.pipe_file(lock_path, body, mode="create")
        except FileExistsError:
            return cls(fs, lock_path, token)
        with suppress(Exception):
            fs.rm_file(lock_path)
        raise StoreError(f"{location}: the object store ignored a conditional write "
                         "(If-None-Match), so it cannot keep a second writer out; shipyard "
                         "writes no store there")

    def release(self) -> None:
        """Delete the lock object while it is still this writer's: its ETag is read before its
        holder, and the delete is conditional on that ETag (S3's `If-Match`), so a lock broken
        and taken by another writer in between is never deleted. A backend that rejects the
        condition (not one that fails it) gets the plain delete."""
        with suppress(Exception):
            self.fs.invalidate_cache(self.path)
            etag = self.fs.info(self.path).get("ETag")
            if read_holder(self.fs, self.path).get("token") != self.token:
                return
            if not etag:
                self.fs.rm_file(self.path)
                return
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            except Exception as exc:
                if "condition" in str(exc).lower():  # 412: the object is another writer's now
                    return
                self.fs.rm_file(self.path)
            finally:
                self.fs.invalidate_cache(self.path)


def read_holder(fs: Any, path: str) -> dict[str, Any]:
    """Who holds a lock object, as it says ({} when it is gone or unreadable)."""
    try:
        data = json.loads(fs.cat_file(path))
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _held(location: str, url: str, holder: dict[str, Any]) -> str:
    who = (f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('since', '?')}"
           if holder else "holder unknown")
    return (f"{location} is being written by another process (lock {url}, {who}); if that "
            f"writer is gone, `shipyard --store {location} store unlock` removes the lock")


def break_lock(location: str, options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Remove the lock object a writer killed while holding it left beside a store on object
    storage: what the lock said of its holder, or None when there was none. Only for a writer
    that is gone: nothing can tell a live one from a dead one there. A local store's lock dies
    with its process, so there is never one to remove; a live writer's is refused."""
    if not is_object_store(location):
        if not store_exists(location, None):
            raise StoreMissingError(f"no shipyard store at {location}")
        release_lock(take_lock(location))  # refused while a live writer holds it
        return None
    fs, path = _object_fs(location, options)
    lock_path = path + LOCK_SUFFIX
    try:
        if not fs.exists(lock_path):
            return None
        holder = read_holder(fs, lock_path)
        fs.rm_file(lock_path)
    except Exception as exc:  # denied, unreachable: one line
        raise StoreError(f"{location}: cannot remove the writer lock {lock_location(location)}: "
                         f"{first_line(exc)}") from None
    return holder


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
