"""CIFAR-10 and CIFAR-100 readers on tiny files in the official python format (protocol 2 pickles of
dicts with byte keys), extracted and as .tar.gz, written here (CIFAR-10) or by tests/conftest.py's
`write_cifar100` (CIFAR-100), and the data configs that build them."""

from __future__ import annotations

import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.classification import LabelledData
from tasks.datasets.cifar import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    CIFAR10_MEMBERS,
    cifar10_data,
    cifar100_data,
    read_cifar10,
    read_cifar100_labelled,
)

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "data"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 3
MARKS = {(0, 2, 30): 11, (1, 5, 7): 22, (2, 31, 0): 33}  # (channel, row, column) -> value of the first image


def pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def write_cifar10(root: Path, archive: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny CIFAR-10 in `root`: cifar-10-batches-py/ (or only cifar-10-python.tar.gz) with PER_BATCH
    random images in each of the 5 training batches and the test batch, dicts laid out as the official
    files. The first training image is black but for MARKS, placed by hand in the 3072-byte row.
    Returns the rows and labels written: {"train_rows", "train_labels", "test_rows", "test_labels"}."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list] = {"train_rows": [], "train_labels": [], "test_rows": [], "test_labels": []}
    for b, member in enumerate(CIFAR10_MEMBERS[:6]):
        rows = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        if b == 0:
            rows[0] = 0
            for (c, i, j), value in MARKS.items():
                rows[0, c * 1024 + i * 32 + j] = value  # 1024 red, then green, then blue bytes; row-major
        labels = [int(v) for v in rng.integers(0, 10, size=PER_BATCH)]
        labels[-1] = 9 if b % 2 else 0  # both ends of the range appear
        batch = {
            b"batch_label": f"{'testing' if member == 'test_batch' else 'training'} batch {b + 1} of 5".encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"image_{b}_{k}.png".encode() for k in range(PER_BATCH)],
        }
        (folder / member).write_bytes(pickled(batch))
        part = "test" if member == "test_batch" else "train"
        written[f"{part}_rows"].append(rows)
        written[f"{part}_labels"].append(labels)
    meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": [n.encode() for n in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickled(meta))
    (folder / "readme.html").write_text("<html>the official archive holds this too</html>")
    if archive:
        with tarfile.open(root / CIFAR10_ARCHIVE, "w:gz") as tar:
            tar.add(folder, arcname=CIFAR10_FOLDER)
        shutil.rmtree(folder)
    return {k: np.concatenate(v) for k, v in written.items()}


@pytest.fixture
def c10_root(tmp_path) -> Path:
    root = tmp_path / "cifar"
    write_cifar10(root)
    return root


def test_cifar10_pixels_and_labels_round_trip(tmp_path):
    written = write_cifar10(tmp_path)
    data = read_cifar10(tmp_path)
    assert data.x_train.shape == (5 * PER_BATCH, 3, 32, 32) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (PER_BATCH, 3, 32, 32) and data.x_test.dtype == np.uint8
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    assert data.y_train.tolist() == written["train_labels"].tolist()  # batches 1..5 in order
    assert data.y_test.tolist() == written["test_labels"].tolist()
    assert data.classes == CLASSES
    first = data.x_train[0]
    assert {tuple(int(v) for v in idx): int(first[tuple(idx)]) for idx in np.argwhere(first)} == MARKS
    for n, row in enumerate(written["train_rows"]):  # every byte, by the official layout
        c, i, j = (n * 7) % 3, (n * 11) % 32, (n * 5 + 3) % 32
        assert data.x_train[n, c, i, j] == row[c * 1024 + i * 32 + j]
        assert np.array_equal(data.x_train[n, c].ravel(), row[c * 1024 : (c + 1) * 1024])
    assert np.array_equal(data.x_test.reshape(PER_BATCH, -1), written["test_rows"])


def test_cifar10_folder_archive_and_root_forms_agree(tmp_path, c10_root):
    packed = tmp_path / "packed"
    write_cifar10(packed, archive=True)
    assert [p.name for p in packed.iterdir()] == [CIFAR10_ARCHIVE]
    ref = read_cifar10(c10_root)
    for source in (c10_root / CIFAR10_FOLDER, packed, packed / CIFAR10_ARCHIVE):
        got = read_cifar10(source)
        assert all(np.array_equal(a, b) for a, b in zip(got[:4], ref[:4])) and got.classes == ref.classes
    assert [p.name for p in packed.iterdir()] == [CIFAR10_ARCHIVE]  # read in place, nothing extracted
    (c10_root / CIFAR10_ARCHIVE).write_bytes(b"broken")  # with both, the folder is read
    assert np.array_equal(read_cifar10(c10_root).x_train, ref.x_train)


def test_cifar10_data_scales_to_unit_floats(c10_root):
    data = cifar10_data(str(c10_root))
    raw = read_cifar10(c10_root)
    assert isinstance(data, LabelledData) and data.name == "cifar10" and data.n_classes == 10
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    assert data.x_train.shape == (15, 3, 32, 32) and data.in_features == 3072
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0 and data.x_train.max() > 0.99
    assert torch.equal((data.x_train * 255).round().to(torch.uint8), torch.from_numpy(raw.x_train))
    assert torch.equal((data.x_test * 255).round().to(torch.uint8), torch.from_numpy(raw.x_test))
    assert data.y_train.tolist() == raw.y_train.tolist() and data.y_test.tolist() == raw.y_test.tolist()
    limited = cifar10_data(str(c10_root), train_limit=4)
    assert limited.x_train.shape == (4, 3, 32, 32) and torch.equal(limited.x_train, data.x_train[:4])
    assert limited.y_train.tolist() == raw.y_train[:4].tolist() and limited.x_test.shape == (3, 3, 32, 32)
    with pytest.raises(ConfigError, match="data.train_limit"):
        cifar10_data(str(c10_root), train_limit=0)


def test_cifar10_nothing_there_names_the_files_the_directory_and_the_key(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        read_cifar10(tmp_path)
    message = str(info.value)
    assert all(f"{CIFAR10_FOLDER}/{m}" in message for m in CIFAR10_MEMBERS) and CIFAR10_ARCHIVE in message
    assert str(tmp_path.resolve()) in message and "data.root" in message


def test_cifar10_incomplete_folder_names_only_the_missing_member(c10_root):
    (c10_root / CIFAR10_FOLDER / "data_batch_3").unlink()
    for root in (c10_root, c10_root / CIFAR10_FOLDER):
        with pytest.raises(DataNotFoundError, match="data.root") as info:
            cifar10_data(str(root))
        message = str(info.value)
        assert "data_batch_3" in message and "data_batch_2" not in message and "test_batch" not in message


GOOD = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 9]}


@pytest.mark.parametrize(
    ("member", "content", "match"),
    [
        ("data_batch_2", b"not a pickle", "not a readable CIFAR-10 pickle"),
        ("test_batch", pickled(GOOD)[:40], "not a readable CIFAR-10 pickle"),
        ("data_batch_1", pickled([1, 2]), "should hold a dict"),
        ("data_batch_5", pickled({b"labels": [0]}), "lacks data"),
        ("test_batch", pickled({**GOOD, b"data": np.zeros((2, 1024), np.uint8)}), "uint8 N x 3072"),
        ("test_batch", pickled({**GOOD, b"data": np.zeros((2, 3072), np.float32)}), "uint8 N x 3072"),
        ("data_batch_4", pickled({**GOOD, b"labels": [0]}), "2 images but 1 labels"),
        ("data_batch_4", pickled({**GOOD, b"labels": [0, 10]}), r"labels outside 0..9"),
        ("data_batch_4", pickled({**GOOD, b"labels": [-1, 0]}), r"labels outside 0..9"),
        ("data_batch_4", pickled({**GOOD, b"labels": [0.5, 1.0]}), "list of integers"),
        ("batches.meta", pickled({b"label_names": [b"a"] * 9}), "should list 10 names"),
    ],
    ids=["garbage", "truncated", "not-a-dict", "no-data", "short-rows", "float", "count", "10", "-1", "floats", "9"],
)
def test_cifar10_wrong_content_is_a_config_error_naming_the_file(c10_root, member, content, match):
    path = c10_root / CIFAR10_FOLDER / member
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        read_cifar10(c10_root)
    assert str(path) in str(info.value) and not isinstance(info.value, DataNotFoundError)


def test_cifar10_damaged_archive_is_a_config_error_naming_it(tmp_path):
    write_cifar10(tmp_path, archive=True)
    path = tmp_path / CIFAR10_ARCHIVE
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"plain text, not gzip"):
        path.write_bytes(damaged)
        with pytest.raises(ConfigError, match=CIFAR10_ARCHIVE) as info:
            read_cifar10(tmp_path)
        assert not isinstance(info.value, DataNotFoundError)
    with tarfile.open(path, "w:gz") as tar:  # a well-formed archive lacking members
        (tmp_path / "data_batch_1").write_bytes(pickled(GOOD))
        tar.add(tmp_path / "data_batch_1", arcname=f"{CIFAR10_FOLDER}/data_batch_1")
    with pytest.raises(ConfigError, match=f"does not contain {CIFAR10_FOLDER}/data_batch_2") as info:
        read_cifar10(path)
    assert f"{CIFAR10_FOLDER}/data_batch_1," not in str(info.value)


# ----------------------------------------------------------------------------- CIFAR-100


def test_cifar100_fine_and_coarse_labels_and_pixels(tmp_path, make_cifar100):
    written = make_cifar100(tmp_path)  # rows in reverse fine-label order; channel 0 = fine label
    fine = read_cifar100_labelled(tmp_path)
    assert fine.x_train.shape == fine.x_test.shape == (100, 3, 32, 32) and fine.x_train.dtype == np.uint8
    assert fine.y_train.dtype == np.int64 and fine.classes == written["fine_names"] and len(fine.classes) == 100
    assert fine.y_train.tolist() == fine.y_test.tolist() == list(range(99, -1, -1))
    assert np.array_equal(fine.x_train[:, 0, 17, 3], fine.y_train.astype(np.uint8))
    pattern = (np.arange(1024) % 251).astype(np.uint8).reshape(32, 32)  # channel 2 = (32 row + column) % 251
    assert all(np.array_equal(image[2], pattern) for image in (*fine.x_train, *fine.x_test))
    coarse = read_cifar100_labelled(tmp_path, "coarse")
    assert coarse.classes == written["coarse_names"] and len(coarse.classes) == 20
    superclass = written["superclass"]
    assert [coarse.classes[c] for c in coarse.y_train] == [superclass[fine.classes[f]] for f in fine.y_train]
    assert np.array_equal(coarse.x_train[:, 1, 0, 0], coarse.y_train)  # channel 1 = coarse label
    assert np.array_equal(coarse.x_test[:, 1, 0, 0], coarse.y_test + 100)  # ... + 100 in the test file
    assert np.array_equal(coarse.x_train, fine.x_train)


def test_cifar100_archive_folder_and_root_forms_agree(tmp_path, make_cifar100):
    make_cifar100(tmp_path / "plain")
    make_cifar100(tmp_path / "packed", archive=True)
    ref = read_cifar100_labelled(tmp_path / "plain", "coarse")
    for source in (
        tmp_path / "plain" / "cifar-100-python",
        tmp_path / "packed",
        tmp_path / "packed" / "cifar-100-python.tar.gz",
    ):
        got = read_cifar100_labelled(source, "coarse")
        assert all(np.array_equal(a, b) for a, b in zip(got[:4], ref[:4])) and got.classes == ref.classes


def test_cifar100_data(tmp_path, make_cifar100):
    make_cifar100(tmp_path)
    fine = cifar100_data(str(tmp_path), train_limit=7)
    assert isinstance(fine, LabelledData) and fine.name == "cifar100" and fine.n_classes == 100
    assert fine.x_train.shape == (7, 3, 32, 32) and fine.x_test.shape == (100, 3, 32, 32)
    assert fine.x_train.dtype == torch.float32 and fine.y_train.dtype == torch.int64
    assert fine.y_train.tolist() == list(range(99, 92, -1))
    assert torch.equal((fine.x_train[:, 0, 0, 0] * 255).round().long(), fine.y_train)
    assert 0.0 <= fine.x_test.min() and fine.x_test.max() <= 1.0
    coarse = cifar100_data(str(tmp_path), label="coarse")
    assert coarse.n_classes == 20 and coarse.y_train.max() == 19 and coarse.y_train.min() == 0


def test_cifar100_wrong_label_kind_and_missing_files(tmp_path, make_cifar100):
    with pytest.raises(ConfigError, match="data.label must be 'fine'.*'coarse'.*got 'medium'"):
        cifar100_data(str(tmp_path), label="medium")
    with pytest.raises(DataNotFoundError) as info:
        cifar100_data(str(tmp_path))
    message = str(info.value)
    assert "cifar-100-python/meta" in message and "cifar-100-python.tar.gz" in message
    assert str(tmp_path.resolve()) in message and "data.root" in message
    make_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickled({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ConfigError, match="lacks fine_labels") as info:
        read_cifar100_labelled(tmp_path)
    assert str(tmp_path / "cifar-100-python" / "train") in str(info.value)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("option", "target", "extra"),
    [("cifar10", cifar10_data, {}), ("cifar100", cifar100_data, {"label": "fine"})],
)
def test_the_data_configs_build_the_readers(tmp_path, make_cifar100, option, target, extra):
    cfg = OmegaConf.load(CONFIGS / f"{option}.yaml")
    assert cfg._target_ == f"tasks.datasets.cifar.{target.__name__}"
    assert {k: cfg[k] for k in extra} == extra and cfg.train_limit is None
    write_cifar10(tmp_path) if option == "cifar10" else make_cifar100(tmp_path)
    data = instantiate(cfg, root=str(tmp_path), train_limit=2)
    assert isinstance(data, LabelledData) and data.name == option and data.x_train.shape == (2, 3, 32, 32)
