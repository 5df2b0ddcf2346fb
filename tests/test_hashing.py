"""Content keys and the stat cache, the mechanism that makes incremental rebuilds both correct and
cheap: a file is re-read exactly when its size, mtime or inode changed, each file once per run,
its digest stored under its own path, and the cache folder found where the docs say."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shipyard.pipeline import hashing
from shipyard.pipeline.hashing import StatCache, default_cache_dir, hash_files


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(5):
        p = tmp_path / "images" / f"{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i]) * (100 + i))
        out.append(p)
    return out


@pytest.fixture
def cache(tmp_path: Path) -> StatCache:
    c = StatCache(tmp_path / "cache" / "stat.sqlite")
    yield c
    c.close()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files actually opened and hashed, in order."""
    seen: list[Path] = []
    real = hashing.sha256_file

    def counted(path: Path) -> bytes:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(hashing, "sha256_file", counted)
    return seen


def digest(p: Path) -> bytes:
    return hashlib.sha256(p.read_bytes()).digest()


def test_a_digest_is_the_sha256_of_the_bytes_read_in_blocks(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(hashing._READ_BLOCK * 2 + 17))  # three reads
    assert hashing.sha256_file(big) == hashlib.sha256(big.read_bytes()).digest()
    assert hashing.sha256_bytes(b"abc") == hashlib.sha256(b"abc").digest()


def test_unchanged_files_are_not_read_again(files: list[Path], cache: StatCache,
                                            reads: list[Path]) -> None:
    first = hash_files(files, cache)
    assert first.read == 5 and sorted(reads) == sorted(files)
    assert first.keys == {p: digest(p) for p in files}
    reads.clear()
    second = hash_files(files, cache)
    assert second.read == 0 and reads == []
    assert second.keys == first.keys


def test_without_a_cache_every_file_is_read_every_time(files: list[Path], reads: list[Path]) -> None:
    assert hash_files(files, None).read == 5
    assert hash_files(files, None).read == 5
    assert len(reads) == 10


def test_a_file_edited_in_place_is_rehashed(files: list[Path], cache: StatCache,
                                            reads: list[Path]) -> None:
    hash_files(files, cache)
    p = files[2]
    st = p.stat()
    with open(p, "r+b") as f:  # same size, same inode, new bytes
        f.write(b"\xff")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    reads.clear()
    again = hash_files(files, cache)
    assert again.read == 1 and reads == [p]
    assert again.keys[p] == digest(p) != hashlib.sha256(bytes([2]) * 102).digest()


def test_a_file_of_another_size_is_rehashed_even_with_its_old_mtime(
        files: list[Path], cache: StatCache, reads: list[Path]) -> None:
    hash_files(files, cache)
    p = files[1]
    st = p.stat()
    p.write_bytes(b"longer than before" * 20)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: only the size differs
    reads.clear()
    assert hash_files(files, cache).keys[p] == digest(p) and reads == [p]


def test_a_file_replaced_by_another_inode_is_rehashed(files: list[Path], cache: StatCache,
                                                      reads: list[Path], tmp_path: Path) -> None:
    hash_files(files, cache)
    p = files[0]
    st = p.stat()
    other = tmp_path / "new.bin"
    other.write_bytes(b"\x07" * st.st_size)  # same size
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    keep = tmp_path / "keep.bin"
    os.link(p, keep)  # the old inode stays alive, so the new file cannot reuse its number
    os.replace(other, p)
    assert p.stat().st_ino != st.st_ino
    reads.clear()
    assert hash_files(files, cache).keys[p] == digest(p) and reads == [p]


def test_the_cache_stores_each_digest_under_its_own_path(files: list[Path],
                                                         cache: StatCache) -> None:
    hash_files(files, cache)
    for p in files:
        assert cache.get(str(p), p.stat()) == digest(p)
    assert cache.get(str(files[0]), files[1].stat()) is None  # another file's size and inode


def test_each_file_is_read_once_across_blocks(files: list[Path], cache: StatCache,
                                              reads: list[Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "_BLOCK_FILES", 2)  # blocks of 2, 2 and 1
    result = hash_files(files, cache, workers=2)
    assert sorted(reads) == sorted(files) and result.read == 5
    assert result.keys == {p: digest(p) for p in files}
    assert all(cache.get(str(p), p.stat()) == digest(p) for p in files)


def test_an_interrupted_run_keeps_the_blocks_it_finished(files: list[Path], cache: StatCache,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "_BLOCK_FILES", 2)
    real, calls = hashing.sha256_file, []

    def dies_on_the_fourth(path: Path) -> bytes:
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(hashing, "sha256_file", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        hash_files(files, cache, workers=1)
    cached = [p for p in files if cache.get(str(p), p.stat()) is not None]
    assert cached == files[:2]  # the first block was stored; the second died with its file


def test_unreadable_entries_are_reported_per_file_and_the_rest_hashed(
        files: list[Path], cache: StatCache, tmp_path: Path) -> None:
    folder = tmp_path / "images" / "a-folder.bin"
    folder.mkdir()
    gone = tmp_path / "images" / "gone.bin"
    result = hash_files([*files, folder, gone], cache)
    assert result.errors == {folder: "not a regular file", gone: "file not found"}
    assert set(result.keys) == set(files) and result.read == 5


def test_progress_counts_every_file_hit_or_miss(files: list[Path], cache: StatCache) -> None:
    hash_files(files[:2], cache)
    ticks: list[int] = []
    hash_files(files, cache, on_progress=ticks.append)
    assert ticks == [1] * 5


def test_the_cache_folder_follows_shipyard_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SHIPYARD_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("SHIPYARD_CACHE_DIR", "")  # empty counts as unset
    assert default_cache_dir() == tmp_path / "xdg" / "shipyard"
    monkeypatch.delenv("SHIPYARD_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "shipyard"


def test_a_missing_or_odd_entry_first_does_not_stop_the_rest(files: list[Path], cache: StatCache,
                                                             tmp_path: Path) -> None:
    gone, folder = tmp_path / "gone.bin", tmp_path / "folder.bin"
    folder.mkdir()
    for first in (gone, folder):
        result = hash_files([first, *files], cache)
        assert set(result.keys) == set(files) and list(result.errors) == [first]


def test_a_path_that_cannot_be_statted_is_named_with_its_reason(files: list[Path],
                                                                cache: StatCache,
                                                                tmp_path: Path) -> None:
    long = tmp_path / ("x" * 300)  # longer than any file name may be
    result = hash_files([long, *files], cache)
    assert result.errors == {long: "cannot stat: File name too long"}
    assert set(result.keys) == set(files)


def test_a_file_that_cannot_be_read_is_named_and_not_cached(files: list[Path], cache: StatCache,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = hashing.sha256_file

    def denied(path: Path) -> bytes:
        if path == files[1]:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(hashing, "sha256_file", denied)
    result = hash_files(files, cache)
    assert result.errors == {files[1]: "cannot read: Permission denied"}
    assert files[1] not in result.keys and cache.get(str(files[1]), files[1].stat()) is None
    assert result.read == 5


def test_a_stat_cache_creates_its_folders_and_reopens(tmp_path: Path, files: list[Path]) -> None:
    path = tmp_path / "deep" / "er" / "stat.sqlite"
    first = StatCache(path)
    hash_files(files, first)
    first.close()
    again = StatCache(path)  # the folder exists now: reopened, rows kept
    try:
        assert all(again.get(str(p), p.stat()) == digest(p) for p in files)
    finally:
        again.close()


@settings(max_examples=25)
@given(contents=st.integers(0, 40).flatmap(lambda size: st.lists(
    st.binary(min_size=size, max_size=size), min_size=2, max_size=6)), data=st.data())
def test_content_keys_are_unchanged_by_renames_and_relabels(contents: list[bytes],
                                                            data: st.DataObject) -> None:
    """Property: a dataset's content keys are the sha256 of each file's bytes whatever the files
    are called or labelled, also when names are swapped under a warm stat cache: the files have
    one size and one mtime, so only the inode tells them apart."""
    import json
    import tempfile

    from shipyard.pipeline.dataset_plan import plan_dataset
    from shipyard.pipeline.manifest import DatasetFormat, DatasetSpec
    from shipyard.pipeline.progress import Silent

    n = len(contents)
    labels = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    relabels = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))  # file i is renamed to the name of file order[i]
    with tempfile.TemporaryDirectory() as where:
        root = Path(where)

        def plan(names: list[str], labelled: list[int]) -> dict[bytes, bytes]:
            entries = [[name, lab, f"c{lab}"] for name, lab in zip(names, labelled, strict=True)]
            entries += [[f"pad{i}", i, f"c{i}"] for i in range(3)]  # every class named
            split = root / "split.json"
            split.write_text(json.dumps({"train": entries, "test": []}))
            spec = DatasetSpec(name="d", format=DatasetFormat.COOP, root=root / "img",
                               split_file=split)
            p = plan_dataset(spec, 1, Silent(), cache_dir=root / "cache")
            by_path = {r.path: k for r, k in zip(p.data.records, p.keys, strict=True)}
            return {(root / "img" / name).read_bytes(): by_path[name] for name in names}

        (root / "img").mkdir()
        names = [f"f{i}.bin" for i in range(n)]
        for name, body in zip(names, contents, strict=True):
            (root / "img" / name).write_bytes(body)
            os.utime(root / "img" / name, ns=(1_700_000_000 * 10**9,) * 2)
        first = plan(names, labels)
        for i, name in enumerate(names):  # rename through temporary names: a permutation
            os.rename(root / "img" / name, root / "img" / f"tmp{i}")
        for i in range(n):
            os.rename(root / "img" / f"tmp{i}", root / "img" / names[order[i]])
        second = plan(names, relabels)
    want = {body: hashlib.sha256(body).digest() for body in contents}
    assert first == second == want
