"""Dataset readers, path safety, the few-shot sampler and the base/new rule."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shipyard.pipeline.datasets import (
    DatasetError,
    Failure,
    Split,
    base_new_split,
    class_counts,
    dassl_few_shot,
    few_shot,
    protocol_warnings,
    read_dataset,
    unsafe_path_reason,
)
from shipyard.pipeline.manifest import DatasetFormat, DatasetSpec, Domain, ImageFolderSplit


def test_base_new_first_half_rounded_up() -> None:
    assert base_new_split(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert base_new_split(7) == ([0, 1, 2, 3], [4, 5, 6])
    assert base_new_split(1) == ([0], [])


def test_few_shot_is_seeded_per_class_and_replaces_only_when_short() -> None:
    labels = np.array([0] * 20 + [1] * 3 + [2] * 16)
    splits = np.full(len(labels), Split.TRAIN)
    splits[:4] = Split.TEST  # not eligible
    rows = few_shot(labels, splits, shots=16, seed=1)
    assert len(rows) == 48
    for label in (0, 1, 2):
        picked = rows[labels[rows] == label]
        assert len(picked) == 16
        assert (splits[picked] == Split.TRAIN).all()
    assert len(set(rows[labels[rows] == 0].tolist())) == 16  # 16 of 16 eligible, no repeats
    assert set(rows[labels[rows] == 1].tolist()) <= {20, 21, 22}  # 3 images: with replacement
    np.testing.assert_array_equal(rows, few_shot(labels, splits, 16, seed=1))
    assert not np.array_equal(rows, few_shot(labels, splits, 16, seed=2))


def test_one_image_under_two_paths_is_one_candidate() -> None:
    labels = np.zeros(6, np.int32)
    splits = np.zeros(6, np.int8)
    keys = np.repeat(np.arange(3, dtype=np.uint8), 2)[:, None].repeat(32, axis=1)  # 3 images, x2
    for seed in range(20):
        rows = few_shot(labels, splits, shots=3, seed=seed, keys=keys)
        assert len({keys[r].tobytes() for r in rows}) == 3, (seed, rows)
    # Without keys, the six rows are six candidates and duplicates are drawn.
    assert any(len({keys[r].tobytes() for r in few_shot(labels, splits, 3, s)}) < 3
               for s in range(20))


@pytest.mark.parametrize(("path", "ok"), [
    ("cat/1.png", True), ("a/./b.png", True), ("../x.png", False), ("a/../../x.png", False),
    ("a/../b.png", False), ("/etc/passwd", False), ("", False),
])
def test_unsafe_paths(path: str, ok: bool) -> None:
    assert (unsafe_path_reason(path) is None) is ok


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def test_imagefolder_seeded_split(tmp_path: Path) -> None:
    for cls in ("ant", "bee_hive"):
        for i in range(10):
            _png(tmp_path / cls / f"{i}.png")
    spec = DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path,
                       split=ImageFolderSplit(val=0.2, test=0.3, seed=3))
    data = read_dataset(spec)
    assert data.classnames == ("ant", "bee hive")
    counts = {s: sum(r.split == s for r in data.records) for s in Split}
    assert counts == {Split.TRAIN: 10, Split.VAL: 4, Split.TEST: 6}
    assert read_dataset(spec).records == data.records  # same seed, same split


def test_imagefolder_with_split_folders(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _png(tmp_path / split / cls / "x.png")
    data = read_dataset(DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path))
    assert [(r.path, r.label, r.split) for r in data.records] == [
        ("train/a/x.png", 0, Split.TRAIN), ("train/b/x.png", 1, Split.TRAIN),
        ("test/a/x.png", 0, Split.TEST), ("test/b/x.png", 1, Split.TEST)]


def test_a_file_name_that_is_not_utf8_is_reported_and_skipped(tmp_path: Path) -> None:
    _png(tmp_path / "ant" / "ok.png")
    _png(tmp_path / "bee" / "ok.png")
    os.rename(tmp_path / "bee" / "ok.png", os.path.join(os.fsencode(tmp_path / "bee"), b"caf\xe9.png"))
    _png(tmp_path / "bee" / "fine.png")
    spec = DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path,
                       split=ImageFolderSplit(val=0.0, test=0.0))
    data = read_dataset(spec)
    assert sorted(r.path for r in data.records) == ["ant/ok.png", "bee/fine.png"]
    assert len(data.rejected) == 1 and "not valid UTF-8" in data.rejected[0].reason


def test_imagefolder_reads_class_subfolders(tmp_path: Path) -> None:
    _png(tmp_path / "ant" / "x.png")
    _png(tmp_path / "ant" / "night" / "y.png")
    _png(tmp_path / "bee" / "z.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    spec = DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path,
                       split=ImageFolderSplit(val=0.0, test=0.0))
    assert sorted(r.path for r in read_dataset(spec).records) == [
        "ant/night/y.png", "ant/x.png", "bee/z.png"]


@pytest.mark.parametrize(("folders", "message"), [
    (("train", "val"), "has train/, val/ but no test/"),
    (("val", "test"), "has val/, test/ but no train/"),
    (("test",), "has test/ but no train/"),
])
def test_imagefolder_split_folders_without_train_or_test(tmp_path: Path, folders: tuple[str, ...],
                                                         message: str) -> None:
    for split in folders:
        _png(tmp_path / split / "a" / "x.png")
    with pytest.raises(DatasetError, match=message):
        read_dataset(DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path))


def test_coop_split_file_errors(tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    spec = DatasetSpec(name="c", format=DatasetFormat.COOP, root=tmp_path, split_file=split)
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(spec)
    split.write_text('{"train": [["a.png", 0, "x"], ["b.png", 2, "z"]], "test": []}')
    with pytest.raises(DatasetError, match="without gaps"):
        read_dataset(spec)
    split.write_text('{"train": [["a.png", 0, "tree_frog"], ["b.png", 1, "tree frog"]], "test": []}')
    with pytest.raises(DatasetError, match="labels 0 and 1 are both named 'tree frog'"):
        read_dataset(spec)
    split.write_text('{"train": [["../a.png", 0, "x"], ["b.png", 0, "x"], ["c.png", 1, "y"]], '
                     '"test": []}')
    data = read_dataset(spec)
    assert [r.path for r in data.records] == ["b.png", "c.png"]
    assert data.rejected[0].path == "../a.png" and "escapes" in data.rejected[0].reason


@pytest.mark.parametrize("sampler", ["dassl", "numpy"])
def test_the_records_say_which_sampler_drew_the_subsets(tmp_path: Path, small_demo: Path,
                                                        sampler: str) -> None:
    """dassl: the train and val subsets are Dassl's, val per seed; numpy: the earlier sampler and
    the whole val split. The record names the sampler, and the planned val keys follow it."""
    from shipyard.pipeline.dataset_plan import facts_of, plan_dataset, records_table, subset_key
    from shipyard.pipeline.datasets import dassl_few_shot
    from shipyard.pipeline.progress import Silent

    spec = DatasetSpec.model_validate({
        "name": "d", "format": "coop", "root": str(small_demo / "images"),
        "split_file": str(small_demo / "split.json"), "shots": 4, "seeds": [1, 2],
        "sampler": sampler})
    plan = plan_dataset(spec, 1, Silent(), tmp_path / "cache")
    arrays, attrs, key = records_table(plan, {k for _, k in plan.hashed()})
    assert attrs["sampler"] == sampler
    labels, splits, keys = arrays["labels"], arrays["splits"], arrays["keys"]
    facts = facts_of(spec, arrays, attrs, key)
    base = attrs["base_labels"]
    for seed in (1, 2):
        if sampler == "dassl":
            train, val = dassl_few_shot(labels, splits, 4, seed, keys)
            np.testing.assert_array_equal(arrays[f"fewshot_val_k4_seed{seed}"], val)
        else:
            train = few_shot(labels, splits, 4, seed, keys)
            val = np.flatnonzero(splits == Split.VAL)
            assert f"fewshot_val_k4_seed{seed}" not in arrays
        np.testing.assert_array_equal(arrays[f"fewshot_k4_seed{seed}"], train)
        val = val[np.isin(labels[val], base)]
        assert facts.val[seed] == subset_key(keys[val], labels[val], tuple(attrs["classnames"]))
    # small_demo has 2 val images per class: Dassl's min(K, 4) = 4 takes both, so the seeds agree
    assert (facts.val[1] == facts.val[2]) is True


# --- split files and folders that are wrong in one place: one line naming that place -----------

def _coop(tmp_path: Path, text: str) -> DatasetSpec:
    split = tmp_path / "split.json"
    split.write_text(text, encoding="utf-8")
    return DatasetSpec(name="c", format=DatasetFormat.COOP, root=tmp_path, split_file=split)


GOOD = '["a.png", 0, "x"], ["b.png", 1, "y"]'


@pytest.mark.parametrize(("text", "message"), [
    ('{"train": [' + GOOD + ']}', "expected an object with keys train, val, test"),
    ('{"test": [' + GOOD + ']}', "expected an object with keys train, val, test"),
    ('[[' + GOOD + ']]', "expected an object with keys train, val, test"),
    ('{"train": [' + GOOD + '], "test": {}}', "test must be a list"),
    ('{"train": [' + GOOD + '], "val": "a.png", "test": []}', "val must be a list"),
    ('{"train": [["a.png", -1, "x"]], "test": []}', r"train\[0\]: expected \[relative_path, label >= 0"),
    ('{"train": [["a.png", true, "x"]], "test": []}', r"train\[0\]: expected"),
    ('{"train": [["a.png", 1.0, "x"]], "test": []}', r"train\[0\]: expected"),
    ('{"train": [' + GOOD + ', ["c.png", 0]], "test": []}', r"train\[2\]: expected"),
    ('{"train": [' + GOOD + ', [7, 0, "x"]], "test": []}', r"train\[2\]: expected"),
    ('{"train": [' + GOOD + ', ["c.png", 0, 3]], "test": []}', r"train\[2\]: expected"),
    ('{"train": [' + GOOD + '], "test": [["c.png", 1, "z"]]}',
     r"test\[0\]: label 1 is named 'z' here but 'y' elsewhere"),
    ('{"train": [], "test": []}', "no images listed"),
    ('{"train": [' + GOOD + '], "test": [] ', "not valid JSON"),
])
def test_a_malformed_split_file_is_refused_naming_the_entry(tmp_path: Path, text: str,
                                                            message: str) -> None:
    with pytest.raises(DatasetError, match=message) as err:
        read_dataset(_coop(tmp_path, text))
    assert str(err.value).startswith(f"dataset c: split file {tmp_path / 'split.json'}: ")
    assert "\n" not in str(err.value)


def test_a_split_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    spec = _coop(tmp_path, "")
    spec.split_file.write_bytes(b'{"train": [["caf\xe9.png", 0, "x"]], "test": []}')
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_dataset(spec)


def test_a_split_file_without_val_reads_train_and_test(tmp_path: Path) -> None:
    data = read_dataset(_coop(tmp_path, '{"train": [' + GOOD + '], "test": [["c.png", 0, "x"]]}'))
    assert [(r.path, r.label, r.split) for r in data.records] == [
        ("a.png", 0, Split.TRAIN), ("b.png", 1, Split.TRAIN), ("c.png", 0, Split.TEST)]
    assert data.classnames == ("x", "y")


@pytest.mark.parametrize("path", ["a\x00b.png", "", "/abs/a.png", "x/../../a.png"])
def test_unsafe_entries_are_rejected_with_their_reason_and_the_rest_kept(tmp_path: Path,
                                                                        path: str) -> None:
    text = '{"train": [' + GOOD + ', [' + json.dumps(path) + ', 0, "x"]], "test": []}'
    data = read_dataset(_coop(tmp_path, text))
    assert [r.path for r in data.records] == ["a.png", "b.png"]
    (rejected,) = data.rejected
    assert rejected.path == path and rejected.reason == unsafe_path_reason(path) is not None


def test_nul_bytes_and_absolute_paths_have_their_own_reasons() -> None:
    assert unsafe_path_reason("a\x00.png") == "empty or invalid path"
    assert unsafe_path_reason("/x.png") == "absolute path; entries must be relative to the image root"
    assert unsafe_path_reason("..") == "path escapes the image root ('..')"
    assert unsafe_path_reason("a/..b.png") is None  # '..' inside a name is not a parent folder


def test_an_image_folder_with_only_train_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(DatasetError, match=r"has train/ but no test/ \(add it"):
        read_dataset(DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path))


def test_a_split_folder_class_missing_from_train_is_refused(tmp_path: Path) -> None:
    for split, cls in (("train", "a"), ("train", "b"), ("test", "a"), ("test", "c")):
        _png(tmp_path / split / cls / "x.png")
    with pytest.raises(DatasetError, match="test/c is not a class in train/"):
        read_dataset(DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path))


def test_empty_image_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetError, match="train/ has no class folders"):
        read_dataset(DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "loose.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="no class folders"):
        read_dataset(DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=flat))
    with pytest.raises(DatasetError, match="is not a folder"):
        read_dataset(DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path / "none"))


def test_non_image_files_and_folder_links_are_not_images(tmp_path: Path) -> None:
    _png(tmp_path / "ant" / "a.PNG")  # suffixes in any case
    (tmp_path / "ant" / "b.png.txt").write_text("no")
    (tmp_path / "ant" / "c").write_text("no suffix")
    (tmp_path / "ant" / "d.png").mkdir()  # a folder named like an image
    _png(tmp_path / "bee" / "z.jpg")
    spec = DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path,
                       split=ImageFolderSplit(val=0.0, test=0.0))
    assert sorted(r.path for r in read_dataset(spec).records) == ["ant/a.PNG", "bee/z.jpg"]


def test_a_one_class_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="1 class; base-to-new needs at"):
        read_dataset(_coop(tmp_path, '{"train": [["a.png", 0, "x"]], "test": []}'))


def test_no_training_rows_give_empty_integer_subsets() -> None:
    labels, splits = np.array([0, 1]), np.array([Split.TEST, Split.TEST])
    rows = few_shot(labels, splits, 4, seed=1)
    assert rows.shape == (0,) and rows.dtype == np.int64
    train, val = dassl_few_shot(labels, splits, 4, seed=1)
    assert train.dtype == val.dtype == np.int64 and train.size == val.size == 0
    assert labels[rows].shape == (0,)  # usable as an index


def test_dassl_sampling_is_the_public_codes_sequence_of_draws() -> None:
    """Reproduced by hand with Python's random: train K per label (every item when a label has
    fewer), then val min(K, 4) per label from the same generator; a label with exactly K items
    is still sampled, so its order is shuffled."""
    import random

    labels = np.array([0] * 8 + [1] * 3 + [0] * 6 + [1] * 6)
    splits = np.array([Split.TRAIN] * 11 + [Split.VAL] * 12)
    train, val = dassl_few_shot(labels, splits, 8, seed=5)
    rng = random.Random(5)
    want_train = [*rng.sample(list(range(8)), 8), 8, 9, 10]
    want_val = rng.sample(list(range(11, 17)), 4) + rng.sample(list(range(17, 23)), 4)
    assert train.tolist() == want_train and val.tolist() == want_val
    assert set(splits[val]) == {Split.VAL}


def test_dassl_sampling_skips_a_second_path_of_the_same_image() -> None:
    labels = np.array([0, 0, 0, 1])
    splits = np.array([Split.TRAIN] * 4)
    keys = np.zeros((4, 32), dtype=np.uint8)
    keys[1, 0], keys[3, 0] = 1, 2  # rows 0 and 2 are one image
    train, _ = dassl_few_shot(labels, splits, 5, seed=0, keys=keys)
    assert sorted(train.tolist()) == [0, 1, 3]


def test_records_carry_their_dataset_name(tmp_path: Path) -> None:
    data = read_dataset(_coop(tmp_path, '{"train": [' + GOOD + '], "test": []}'))
    assert data.name == "c" and data.root == tmp_path


def _synthetic(tmp_path: Path, text: str) -> DatasetSpec:
    split = tmp_path / "split.json"
    split.write_text(text, encoding="utf-8")
    return DatasetSpec(name="syn", format=DatasetFormat.COOP, root=tmp_path, split_file=split,
                       domain=Domain.SYNTHETIC, pairs_with="real")


def test_a_synthetic_dataset_takes_the_real_classes_by_name_and_trains_only(tmp_path: Path) -> None:
    """Relabelled to the real dataset's class order, every entry a training image, even those
    its own split file puts in val or test; a single class of its own is enough."""
    spec = _synthetic(tmp_path, '{"train": [["s/a.png", 0, "dog"], ["s/b.png", 1, "ant"]], '
                                '"val": [["s/c.png", 1, "ant"]], "test": [["s/d.png", 0, "dog"]]}')
    data = read_dataset(spec, classes_of=("ant", "bee", "dog"))
    assert data.classnames == ("ant", "bee", "dog")
    assert [(r.path, r.label, r.split) for r in data.records] == [
        ("s/a.png", 2, Split.TRAIN), ("s/b.png", 0, Split.TRAIN), ("s/c.png", 0, Split.TRAIN),
        ("s/d.png", 2, Split.TRAIN)]
    one = read_dataset(_synthetic(tmp_path, '{"train": [["s/a.png", 0, "bee"]], "test": []}'),
                       classes_of=("ant", "bee"))
    assert [(r.label, r.split) for r in one.records] == [(1, Split.TRAIN)]


def test_a_synthetic_class_the_real_dataset_lacks_is_refused_naming_it(tmp_path: Path) -> None:
    spec = _synthetic(tmp_path, '{"train": [["a.png", 0, "dog"], ["b.png", 1, "wolf"]], "test": []}')
    with pytest.raises(DatasetError, match=r"^dataset syn: class 'wolf' is not a class of real "
                                           r"\(its classes: ant, dog\)$"):
        read_dataset(spec, classes_of=("ant", "dog"))
    many = tuple(f"c{i}" for i in range(7))
    with pytest.raises(DatasetError, match=r"\(its classes: c0, c1, c2, c3, c4, c5, \.\.\.\)$"):
        read_dataset(spec, classes_of=many)
    six = many[:6]
    with pytest.raises(DatasetError, match=r"\(its classes: c0, c1, c2, c3, c4, c5\)$"):
        read_dataset(spec, classes_of=six)


def test_unsafe_synthetic_entries_are_rejected_like_real_ones(tmp_path: Path) -> None:
    spec = _synthetic(tmp_path, '{"train": [["../a.png", 0, "dog"], ["b.png", 0, "dog"]], "test": []}')
    data = read_dataset(spec, classes_of=("dog", "cat"))
    assert [r.path for r in data.records] == ["b.png"] and data.rejected[0].path == "../a.png"


def test_protocol_warnings_name_one_class_sides_and_a_missing_val_split() -> None:
    one = "the {} side has a single class, so its accuracy is 100 by construction"
    assert protocol_warnings([0, 1], [2, 3], val_images=5, tunes_on_val=True) == []
    assert protocol_warnings([0], [1], val_images=5, tunes_on_val=False) == [
        one.format("base"), one.format("new")]
    assert protocol_warnings([0, 1], [2], val_images=5, tunes_on_val=False) == [one.format("new")]
    assert protocol_warnings([0], [1, 2], val_images=5, tunes_on_val=False) == [one.format("base")]
    assert protocol_warnings([0, 1], [2, 3], val_images=0, tunes_on_val=False) == []
    assert protocol_warnings([0, 1], [2, 3], val_images=1, tunes_on_val=True) == []
    assert protocol_warnings([0, 1], [2, 3], val_images=0, tunes_on_val=True, init=(1.5, 5.0)) == [
        "there is no val split, so Tip-Adapter's alpha and beta were not searched (the initial "
        "alpha 1.5, beta 5)"]
    assert protocol_warnings([0, 1], [2, 3], val_images=0, tunes_on_val=True)[0].endswith(
        "(the initial alpha 1, beta 1)")


def test_class_counts_include_classes_without_images() -> None:
    assert class_counts([2, 0, 2], num_classes=4) == [1, 0, 2, 0]
    assert class_counts([], num_classes=2) == [0, 0]


@pytest.mark.parametrize("tops", [("",), ("train/", "test/")], ids=["class-folders", "split-folders"])
def test_image_folder_errors_name_the_dataset_and_the_folder(tmp_path: Path, tops: tuple[str, ...]) -> None:
    for top in tops:
        for cls in ("tree_frog", "tree frog"):
            _png(tmp_path / f"{top}{cls}" / "x.png")
    spec = DatasetSpec(name="f", format=DatasetFormat.IMAGEFOLDER, root=tmp_path)
    with pytest.raises(DatasetError, match=rf"^dataset f: image folder {re.escape(str(tmp_path))}: "
                                           r"labels 0 and 1 are both named 'tree frog' \('_' reads "
                                           r"as a space\); class names must differ$"):
        read_dataset(spec)


def test_label_gaps_are_listed_five_at_most(tmp_path: Path) -> None:
    rows = ", ".join(f'["{i}.png", {i}, "c{i}"]' for i in (0, 7))
    with pytest.raises(DatasetError, match=r"labels must be 0\.\.7 without gaps; missing "
                                           r"\[1, 2, 3, 4, 5\]$"):
        read_dataset(_coop(tmp_path, f'{{"train": [{rows}], "test": []}}'))


def test_a_failure_is_reported_as_its_path_and_reason() -> None:
    assert Failure("a/b.png", "file not found").to_dict() == {"path": "a/b.png",
                                                             "reason": "file not found"}
