"""Content keys for image files: sha256 of the bytes, with a stat cache so unchanged files are
not re-read. The cache is keyed by (absolute path, size, mtime_ns, inode) and lives on the local
machine, never in the shared store."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .locations import first_line
from .remote_paths import RemotePath, RemoteStat

_READ_BLOCK = 1 << 20
_BLOCK_FILES = 4096


def default_cache_dir() -> Path:
    """$SHIPYARD_CACHE_DIR, else $XDG_CACHE_HOME/shipyard, else ~/.cache/shipyard."""
    explicit = os.environ.get("SHIPYARD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "shipyard"


def sha256_bytes(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha256_file(path: Path | RemotePath) -> bytes:
    if isinstance(path, RemotePath):  # one GET; objects are images, not gigabytes
        return hashlib.sha256(path.read_bytes()).digest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.digest()


def digest_or_reason(path: Path | RemotePath) -> bytes | str:
    """A file's sha256, or why it could not be read (on a dask worker too)."""
    try:
        return sha256_file(path)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    except Exception as exc:  # an object store client's own error types
        if not isinstance(path, RemotePath):
            raise
        return f"cannot read: {first_line(exc)}"


@dataclass(frozen=True)
class HashResult:
    keys: dict[Any, bytes]  # path (Path or RemotePath) -> 32-byte digest, for every file read
    errors: dict[Any, str]  # path -> reason, for files that could not
    read: int  # files actually read (stat-cache misses)


class StatCache:
    """sqlite table path -> (size, mtime_ns, inode, digest). Safe to delete at any time."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS stat (path TEXT PRIMARY KEY, size INTEGER, "
                         "mtime_ns INTEGER, ino INTEGER, digest BLOB)")

    def get(self, path: str, st: Any) -> bytes | None:
        """The digest cached for `path` if its (size, mtime_ns, inode) still match `st` (an
        os.stat_result, or a RemotePath's stat: size, mtime, a number from the ETag)."""
        row = self._db.execute("SELECT size, mtime_ns, ino, digest FROM stat WHERE path = ?",
                               (path,)).fetchone()
        if row and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ino):
            return bytes(row[3])
        return None

    def put_many(self, rows: list[tuple[str, int, int, int, bytes]]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO stat VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()


def hash_files(
    paths: Sequence[Path | RemotePath],
    cache: StatCache | None,
    workers: int = 4,
    on_progress: Callable[[int], None] | None = None,
    remote: Callable[[list[Any]], list[bytes | str]] | None = None,
) -> HashResult:
    """sha256 every file, reading only those the stat cache cannot vouch for. With `remote`
    (dask workers), the misses on object storage are hashed there, not here."""
    keys: dict[Any, bytes] = {}
    errors: dict[Any, str] = {}
    misses: list[tuple[Any, Any]] = []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            errors[p] = "file not found"
            continue
        except OSError as exc:
            errors[p] = f"cannot stat: {exc.strerror or exc}"
            continue
        except Exception as exc:  # an object store client's own error types
            if not isinstance(p, RemotePath):
                raise
            errors[p] = f"cannot stat: {first_line(exc)}"
            continue
        if (isinstance(st, RemoteStat) and not st.is_file) or \
                (not isinstance(st, RemoteStat) and not p.is_file()):
            errors[p] = "not a regular file"
            continue
        hit = cache.get(str(p), st) if cache else None
        if hit is not None:
            keys[p] = hit
            if on_progress:
                on_progress(1)
        else:
            misses.append((p, st))

    def work(item: tuple[Any, Any]) -> tuple[Any, Any, bytes | str]:
        return item[0], item[1], digest_or_reason(item[0])

    fresh: list[tuple[str, int, int, int, bytes]] = []

    def done(p: Any, st: Any, out: bytes | str) -> None:
        if isinstance(out, bytes):
            keys[p] = out
            fresh.append((str(p), st.st_size, st.st_mtime_ns, st.st_ino, out))
        else:
            errors[p] = out
        if on_progress:
            on_progress(1)

    if remote is not None:
        elsewhere = [m for m in misses if isinstance(m[0], RemotePath)]
        misses = [m for m in misses if not isinstance(m[0], RemotePath)]
        for start in range(0, len(elsewhere), _BLOCK_FILES):
            block = elsewhere[start : start + _BLOCK_FILES]
            for (p, st), out in zip(block, remote([p for p, _ in block]), strict=True):
                done(p, st, out)
            if cache and fresh:
                cache.put_many(fresh)
            fresh.clear()
        read = len(elsewhere)
    else:
        read = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Blocks bound the number of pending futures; each block's digests are cached at once so
        # an interrupted run keeps what it hashed.
        for start in range(0, len(misses), _BLOCK_FILES):
            for p, st, out in pool.map(work, misses[start : start + _BLOCK_FILES]):
                done(p, st, out)
            if cache and fresh:
                cache.put_many(fresh)
            fresh.clear()
    return HashResult(keys, errors, read + len(misses))
