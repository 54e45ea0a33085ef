"""CIFAR-FS and FC100 on a tiny CIFAR-100 in the official python format (tests/conftest.py:
`write_cifar100`), extracted or as cifar-100-python.tar.gz, and the optional download."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.base import SPLITS
from tasks.datasets import cifar_fs
from tasks.datasets.cifar_fs import (
    ARCHIVE,
    CIFAR_FS_CLASSES,
    FC100_SUPERCLASSES,
    cifar_fs_classes,
    cifar_fs_task,
    fc100_classes,
    fc100_task,
    load_cifar100,
    read_cifar100,
)
from tasks.few_shot import FewShotSampler

MEMBER_FILES = ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")
TINY = {"n_way": 3, "k_shot": 1, "q_query": 1}  # the fixture has 2 images per class


@pytest.fixture
def cifar_root(tmp_path, make_cifar100) -> Path:
    root = tmp_path / "cifar"
    make_cifar100(root)
    return root


def test_the_published_class_lists(tmp_path, make_cifar100):
    superclass = make_cifar100(tmp_path)["superclass"]  # the official fine name -> superclass name
    parts = [set(CIFAR_FS_CLASSES[s]) for s in SPLITS]
    assert [len(CIFAR_FS_CLASSES[s]) for s in SPLITS] == [len(p) for p in parts] == [64, 16, 20]
    assert set.union(*parts) == set(superclass) and sum(map(len, parts)) == 100  # disjoint and complete
    assert "dolphin" in parts[0] and "beaver" in parts[1] and "whale" in parts[2]
    supers = [set(FC100_SUPERCLASSES[s]) for s in SPLITS]
    assert [len(p) for p in supers] == [12, 4, 4] and set.union(*supers) == set(superclass.values())
    assert supers[2] == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert supers[1] == {
        "large_carnivores",
        "large_omnivores_and_herbivores",
        "non-insect_invertebrates",
        "small_mammals",
    }


def test_read_the_extracted_folder(cifar_root, make_cifar100):
    written = make_cifar100(cifar_root)
    data = load_cifar100(cifar_root)
    assert data.images.shape == (200, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.fine.dtype == data.coarse.dtype == torch.int64
    assert data.fine_names == written["fine_names"] and data.coarse_names == written["coarse_names"]
    assert data.fine.tolist() == list(range(99, -1, -1)) * 2  # train rows, then test rows
    superclass = written["superclass"]
    assert [data.coarse_names[c] for c in data.coarse] == [superclass[data.fine_names[f]] for f in data.fine]
    # pixels: the 3072 bytes of a row are channel-major, then row-major 32 x 32
    assert torch.equal(data.images[:, 0, 5, 7].long(), data.fine)
    test_shift = torch.tensor([0, 100]).repeat_interleave(100)  # the fixture adds 100 in the test file
    assert torch.equal(data.images[:, 1, 31, 0].long(), data.coarse + test_shift)
    pattern = torch.from_numpy((np.arange(1024) % 251).astype(np.uint8).reshape(32, 32))
    assert all(torch.equal(image[2], pattern) for image in data.images)


def test_the_archive_is_read_in_place_and_equals_the_folder(cifar_root, tmp_path, make_cifar100):
    packed = tmp_path / "packed"
    make_cifar100(packed, archive=True)
    assert [p.name for p in packed.iterdir()] == [ARCHIVE]
    a, b = load_cifar100(cifar_root), load_cifar100(packed)
    assert torch.equal(a.images, b.images) and torch.equal(a.fine, b.fine) and torch.equal(a.coarse, b.coarse)
    assert a.fine_names == b.fine_names and a.coarse_names == b.coarse_names
    assert [p.name for p in packed.iterdir()] == [ARCHIVE]  # nothing extracted
    (cifar_root / ARCHIVE).write_bytes(b"broken")  # with both, the folder is read
    assert torch.equal(load_cifar100(cifar_root).images, a.images)


def check_split_pixels(sampler: FewShotSampler, allowed: set[int]) -> None:
    e = sampler.episode(0)
    assert e.support_x.shape == (3, 3, 32, 32) and e.query_x.shape == (3, 3, 32, 32)
    assert e.support_x.dtype == torch.float32 and set(e.meta["classes"]) <= allowed
    for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
        fine = (x[:, 0, 0, 0] * 255).round().long()  # channel 0 holds the fine label
        assert fine.tolist() == [e.meta["classes"][label] for label in y.tolist()]


def test_cifar_fs_task_uses_the_published_classes(cifar_root):
    splits = cifar_fs_task(str(cifar_root), **TINY)
    assert splits.loss == "cross_entropy" and splits.metric == "accuracy"
    data = load_cifar100(cifar_root)
    seen = []
    for split in SPLITS:
        sampler = getattr(splits, split)
        assert isinstance(sampler, FewShotSampler)
        assert {data.fine_names[c] for c in sampler.classes} == set(CIFAR_FS_CLASSES[split])
        check_split_pixels(sampler, set(sampler.classes))
        seen += sampler.classes
    assert sorted(seen) == list(range(100))


def test_fc100_task_splits_by_superclass(cifar_root, make_cifar100):
    superclass = make_cifar100(cifar_root)["superclass"]
    splits = fc100_task(str(cifar_root), **TINY)
    data = load_cifar100(cifar_root)
    seen = []
    for split in SPLITS:
        sampler = getattr(splits, split)
        names = [data.fine_names[c] for c in sampler.classes]
        assert {superclass[n] for n in names} == set(FC100_SUPERCLASSES[split])
        assert len(names) == {"train": 60, "val": 20, "test": 20}[split]
        check_split_pixels(sampler, set(sampler.classes))
        seen += sampler.classes
    assert sorted(seen) == list(range(100))


def test_classes_follow_the_names_in_meta_not_their_positions(tmp_path, make_cifar100):
    written = make_cifar100(tmp_path, shuffle=3)
    data = load_cifar100(tmp_path)
    assert data.fine_names == written["fine_names"] != sorted(written["fine_names"])
    for split, classes in cifar_fs_classes(data).items():
        assert {data.fine_names[c] for c in classes} == set(CIFAR_FS_CLASSES[split])
    for split, classes in fc100_classes(data).items():
        assert {written["superclass"][data.fine_names[c]] for c in classes} == set(FC100_SUPERCLASSES[split])
    assert torch.equal(data.images[:, 0, 0, 0].long(), data.fine)


def test_nothing_there_names_both_layouts_the_directory_the_key_and_the_download(tmp_path):
    for task in (cifar_fs_task, fc100_task):
        with pytest.raises(DataNotFoundError) as info:
            task(str(tmp_path))
        message = str(info.value)
        assert all(name in message for name in (*MEMBER_FILES, ARCHIVE))
        assert str(tmp_path.resolve()) in message and "task.root" in message and "task.download=true" in message


def test_an_incomplete_folder_names_the_missing_member(cifar_root):
    (cifar_root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_cifar100(cifar_root)
    message = str(info.value)
    assert "(missing cifar-100-python/meta)" in message and "cifar-100-python/train" not in message


def pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


GOOD = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [0, 0]}


@pytest.mark.parametrize(
    ("member", "content", "match"),
    [
        ("train", b"not a pickle", "not a readable CIFAR-100 pickle"),
        ("test", pickled(GOOD)[:40], "not a readable CIFAR-100 pickle"),
        ("train", pickled([1, 2]), "should hold a dict"),
        ("train", pickled({b"fine_labels": [0], b"coarse_labels": [0]}), "lacks data"),
        ("test", pickled({**GOOD, b"data": np.zeros((2, 1024), np.uint8)}), "uint8 N x 3072"),
        ("test", pickled({**GOOD, b"data": np.zeros((2, 3072), np.float32)}), "uint8 N x 3072"),
        ("train", pickled({**GOOD, b"fine_labels": [0]}), "2 images but"),
        ("train", pickled({**GOOD, b"fine_labels": [0, 100]}), "fine_labels outside 0..99"),
        ("train", pickled({**GOOD, b"coarse_labels": ["a", "b"]}), "lists of integers"),
        ("train", pickled({**GOOD, b"fine_labels": [0, 0], b"coarse_labels": [0, 1]}), "more than one coarse label"),
        ("meta", pickled({b"fine_label_names": [b"a"] * 99, b"coarse_label_names": [b"b"] * 20}), "list 100 names"),
    ],
    ids=[
        "garbage",
        "truncated",
        "not-a-dict",
        "no-data",
        "short-rows",
        "float",
        "label-count",
        "label-range",
        "text-labels",
        "two-superclasses",
        "99-names",
    ],  # fmt: skip
)
def test_wrong_content_is_a_config_error_naming_the_file(cifar_root, member, content, match):
    (cifar_root / "cifar-100-python" / member).write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        read_cifar100(cifar_root / "cifar-100-python")
    assert str(cifar_root / "cifar-100-python") in str(info.value)


def test_a_damaged_archive_is_a_config_error_naming_it(tmp_path, make_cifar100):
    make_cifar100(tmp_path, archive=True)
    path = tmp_path / ARCHIVE
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"plain text, not gzip"):
        path.write_bytes(damaged)
        with pytest.raises(ConfigError, match="cifar-100-python.tar.gz") as info:
            load_cifar100(tmp_path)
        assert not isinstance(info.value, DataNotFoundError)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("cifar-100-python/train")
        member.size = len(pickled(GOOD))
        tar.addfile(member, io.BytesIO(pickled(GOOD)))
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ConfigError, match="does not contain cifar-100-python/test, cifar-100-python/meta"):
        load_cifar100(tmp_path)


def test_the_official_source_is_the_default():
    assert cifar_fs.archive_url() == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert cifar_fs.CHECKSUM == "md5:eb9058c3a382ffc7106e4002c42a8d85"


def test_download_from_a_file_url_with_good_and_bad_checksums(tmp_path, make_cifar100):
    server = tmp_path / "server"
    make_cifar100(server, archive=True)
    md5 = hashlib.md5((server / ARCHIVE).read_bytes()).hexdigest()
    bad = tmp_path / "bad"
    with pytest.raises(ConfigError, match="checksum mismatch"):
        fc100_task(str(bad), **TINY, download=True, base_url=server.as_uri(), checksum="md5:" + "0" * 32)
    assert not bad.exists() or list(bad.iterdir()) == []  # no partial file
    with pytest.raises(ConfigError, match="could not download"):
        fc100_task(str(bad), **TINY, download=True, base_url=(tmp_path / "nowhere").as_uri())
    assert not bad.exists() or list(bad.iterdir()) == []
    good = tmp_path / "good"
    splits = cifar_fs_task(str(good), **TINY, download=True, base_url=server.as_uri() + "/", checksum=f"md5:{md5}")
    assert [p.name for p in good.iterdir()] == [ARCHIVE]
    assert (good / ARCHIVE).read_bytes() == (server / ARCHIVE).read_bytes()
    assert len(splits.test.classes) == 20
    # present data is never downloaded again (this URL does not exist)
    fc100_task(str(good), **TINY, download=True, base_url=(tmp_path / "nowhere").as_uri())


def test_the_cache_is_opt_in_read_back_and_never_half_written(cifar_root, tmp_path, monkeypatch):
    load_cifar100(cifar_root)
    assert [p.name for p in cifar_root.iterdir()] == ["cifar-100-python"]  # no cache by default
    cache = tmp_path / "cache"
    first = load_cifar100(cifar_root, cache_dir=cache)
    assert [p.suffix for p in cache.iterdir()] == [".npz"]

    def fail(source):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cifar_fs, "read_cifar100", fail)
    second = fc100_task(str(cifar_root), **TINY, cache_dir=str(cache))  # from the cache
    assert torch.equal(second.train.inputs, first.images)
    monkeypatch.undo()
    (cifar_root / "cifar-100-python" / "test").write_bytes(b"damaged")  # a new fingerprint: decoded again
    with pytest.raises(ConfigError, match="not a readable"):
        load_cifar100(cifar_root, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1  # only the first, complete cache
