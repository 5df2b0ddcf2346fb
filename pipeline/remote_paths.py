"""Image roots on object storage: a dataset's `root` may be an fsspec URL (`s3://bucket/images`,
with `root_options` beside it), read through fsspec wherever a local root is read through
pathlib. `RemotePath` has the part of pathlib's interface the readers use (joining, listing,
reading, stat), so listing, split files, hashing, decoding and the stat cache take either.

Its `stat()` stands in for os.stat: the object's size, its modification time (ns) and, as the
`st_ino` a local file's identity would take, a number derived from its ETag (or version id)
where the store has one. The stat cache keys on (URL, size, mtime, that number): an object
rewritten in place gets a new ETag, so it is hashed again."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import UsageError
from .locations import is_url


@dataclass(frozen=True)
class RemoteStat:
    st_size: int
    st_mtime_ns: int
    st_ino: int
    is_file: bool = True


def _mtime_ns(info: dict[str, Any]) -> int:
    value = info.get("LastModified", info.get("mtime", info.get("last_modified", 0)))
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000_000)
    if isinstance(value, int | float):
        return int(value * 1_000_000_000)
    return 0


def _tag(info: dict[str, Any]) -> int:
    tag = info.get("ETag") or info.get("etag") or info.get("VersionId") or ""
    digest = hashlib.sha256(str(tag).encode()).digest()
    return int.from_bytes(digest[:7], "little")  # fits sqlite's signed 64-bit integers


@dataclass(frozen=True)
class RemotePath:
    """A file or folder under an fsspec URL. Equal and hashed by URL (options are not identity)."""

    url: str
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/") if self.url.count("/") > 2
                           else self.url)

    @cached_property
    def _fs(self) -> Any:
        import fsspec

        try:
            fs, _ = fsspec.core.url_to_fs(self.url, **self.options)
        except (ImportError, ValueError) as exc:
            raise UsageError(f"image root {self.url}: {exc}") from None
        return fs

    @property
    def _key(self) -> str:
        return str(self._fs._strip_protocol(self.url))

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, other: str | Path) -> RemotePath:
        joined = RemotePath(posixpath.join(self.url, Path(other).as_posix()), self.options)
        object.__setattr__(joined, "_fs", self._fs)  # one filesystem object for the whole tree
        return joined

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)

    def _info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self._fs.info(self._key)
            return info
        except FileNotFoundError:
            return None

    def is_dir(self) -> bool:
        try:
            return bool(self._fs.isdir(self._key))
        except FileNotFoundError:
            return False

    def is_file(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "file"

    def stat(self) -> RemoteStat:
        info = self._info()
        if info is None:
            raise FileNotFoundError(self.url)
        return RemoteStat(int(info.get("size") or 0), _mtime_ns(info), _tag(info),
                          info.get("type") == "file")

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}  # not the filesystem (a worker's own)

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "url", state["url"])
        object.__setattr__(self, "options", state["options"])

    def read_bytes(self) -> bytes:
        data: bytes = self._fs.cat_file(self._key)
        return data

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def iterdir(self) -> Iterator[RemotePath]:
        for entry in self._fs.ls(self._key, detail=False):
            name = posixpath.basename(str(entry).rstrip("/"))
            if name:
                yield self / name

    def files(self) -> list[str]:
        """Every file under this folder, as '/'-separated paths relative to it, sorted."""
        base = self._key.rstrip("/") + "/"
        found = self._fs.find(self._key)
        return sorted(str(f)[len(base):] for f in found if str(f).startswith(base))


def image_root(root: str | Path, options: dict[str, Any] | None = None) -> Path | RemotePath:
    """A dataset root as the readers take it: a local Path, or a RemotePath for a URL."""
    if isinstance(root, str) and is_url(root):
        return RemotePath(root, dict(options or {}))
    return Path(root)
