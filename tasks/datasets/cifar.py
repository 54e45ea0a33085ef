"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, "Learning multiple layers of features from tiny images"),
read from the official python versions (https://www.cs.toronto.edu/~kriz/cifar.html), for ordinary
and noisy-label training.

Files: CIFAR-10 is the folder `cifar-10-batches-py/` with `data_batch_1` .. `data_batch_5` (10,000
images each), `test_batch` and `batches.meta`, or the archive `cifar-10-python.tar.gz` holding that
folder; CIFAR-100 is the folder `cifar-100-python/` with `train`, `test` and `meta`, or
`cifar-100-python.tar.gz` (read by `tasks.datasets.cifar_fs`). Every file is a Python 2 pickle of a
dict with byte keys: b"data" (uint8 N x 3072: each row 1024 red, then 1024 green, then 1024 blue
bytes, each plane a row-major 32 x 32 image) and b"labels" (CIFAR-10) or b"fine_labels" and
b"coarse_labels" (CIFAR-100); the meta file holds b"label_names" (10) or b"fine_label_names" (100)
and b"coarse_label_names" (20).

`root` may be the folder itself, the archive itself, or a directory holding either (the folder
wins; the archive is read in place, never extracted). Nothing is downloaded. Images come out as
uint8 [N, 3, 32, 32] (channel, row, column) and labels as int64; the data builders scale pixels to
float32 in [0, 1] without normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from metaloss.errors import ConfigError
from tasks.classification import LabelledData
from tasks.datasets import cifar_fs
from tasks.datasets.cifar_fs import _arrays, _names, _read_members, member_location
from tasks.datasets.common import require_files, require_layout

DEFAULT_ROOT = "~/data/cifar"
URL = "https://www.cs.toronto.edu/~kriz/"

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_MEMBERS = (*CIFAR10_TRAIN, "test_batch", "batches.meta")
CIFAR100_LABELS = {"fine": 100, "coarse": 20}  # label kind -> number of classes


class CifarArrays(NamedTuple):
    """One CIFAR dataset as decoded: x uint8 [N, 3, 32, 32], y int64 [N] indices into `classes`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]


def locate(
    root: str | Path, folder: str, archive: str, members: tuple[str, ...], dataset: str, root_key: str = "data.root"
) -> Path:
    """The folder or archive to read for `root`: `root` itself when it is a file (the archive) or
    the folder (named `folder`, or holding any of `members`), else `root/folder` when complete,
    else `root/archive`. Missing files: one DataNotFoundError naming them, the directory and `root_key`."""
    root = Path(root).expanduser()
    if root.is_file():
        return root
    if root.name == folder or any((root / m).is_file() for m in members):
        return require_files(root, members, dataset, root_key)
    layouts = {
        f"the extracted folder {folder}/": [f"{folder}/{m}" for m in members],
        f"the archive {archive}": [archive],
    }
    hint = f" (the official archive is {URL}{archive}; nothing is downloaded here)"
    layout = require_layout(root, layouts, dataset, root_key, hint)
    return root / folder if layout.startswith("the extracted") else root / archive


def _read_cifar10_members(source: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """member -> (its unpickled dict, where it was read: for messages) of the folder or archive `source`."""
    parts = _read_members(source, CIFAR10_FOLDER, tuple(CIFAR10_MEMBERS), "CIFAR-10")
    return {m: (part, member_location(source, CIFAR10_FOLDER, m)) for m, part in parts.items()}


def _cifar10_batch(part: dict[str, Any], where: str, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3, 32, 32], int64 [N]) of one CIFAR-10 batch, checked."""
    missing = [k for k in ("data", "labels") if k not in part]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)} (found keys {sorted(part)})")
    data = np.asarray(part["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ConfigError(f"{where}: 'data' should be uint8 N x 3072, got {data.dtype} {data.shape}")
    raw = np.asarray(part["labels"])
    if raw.ndim != 1 or (raw.size and raw.dtype.kind not in "iu"):
        raise ConfigError(f"{where}: 'labels' should be a list of integers, got {raw.dtype} {raw.shape}")
    labels = raw.astype(np.int64)
    if len(labels) != len(data):
        raise ConfigError(f"{where}: {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ConfigError(f"{where}: labels outside 0..{n_classes - 1} (found {labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(source: str | Path, root_key: str = "data.root") -> CifarArrays:
    """CIFAR-10 from `source` (the folder, the archive, or a directory holding either): x_train
    uint8 [50000, 3, 32, 32] (data_batch_1 .. 5 in order), y_train int64, x_test [10000, ...], y_test,
    and the 10 class names of `batches.meta`. ConfigError naming the file for anything that is not
    in the official format; DataNotFoundError when the files are not there."""
    path = locate(source, CIFAR10_FOLDER, CIFAR10_ARCHIVE, CIFAR10_MEMBERS, "CIFAR-10 (python version)", root_key)
    parts = _read_cifar10_members(path)
    meta, where = parts["batches.meta"]
    classes = _names(meta, "label_names", 10, where)
    train = [_cifar10_batch(*parts[m]) for m in CIFAR10_TRAIN]
    x_test, y_test = _cifar10_batch(*parts["test_batch"])
    return CifarArrays(
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        np.array(x_test),  # a writable copy
        y_test,
        classes,
    )


def _check_label(label: str) -> int:
    if label not in CIFAR100_LABELS:
        raise ConfigError(f"data.label must be 'fine' (100 classes) or 'coarse' (20 superclasses), got {label!r}")
    return CIFAR100_LABELS[label]


def read_cifar100_labelled(source: str | Path, label: str = "fine", root_key: str = "data.root") -> CifarArrays:
    """CIFAR-100 from `source` (the folder, the archive, or a directory holding either), train and
    test kept apart: x uint8 [50000 | 10000, 3, 32, 32], y int64 the `label` kind ("fine": 100
    classes, "coarse": 20 superclasses) and its class names, in the order of `meta`."""
    n_classes = _check_label(label)
    path = locate(source, cifar_fs.FOLDER, cifar_fs.ARCHIVE, cifar_fs.MEMBERS, "CIFAR-100 (python version)", root_key)
    parts = _read_members(path)
    where = {m: str(path / m) if path.is_dir() else f"{path} ({cifar_fs.FOLDER}/{m})" for m in cifar_fs.MEMBERS}
    classes = _names(parts["meta"], f"{label}_label_names", n_classes, where["meta"])
    column = 1 if label == "fine" else 2  # _arrays: (images, fine, coarse)
    train, test = (_arrays(parts[m], where[m], 100, 20) for m in ("train", "test"))
    return CifarArrays(np.array(train[0]), train[column], np.array(test[0]), test[column], classes)


def _check_limit(limit: int | None, key: str) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{key} must be null or a positive integer, got {limit!r}")


def _labelled(name: str, arrays: CifarArrays, n_classes: int, train_limit: int | None) -> LabelledData:
    _check_limit(train_limit, "data.train_limit")
    x_train, y_train = arrays.x_train[:train_limit], arrays.y_train[:train_limit]
    pixels = lambda a: torch.from_numpy(a.astype(np.float32)).div_(255.0)  # noqa: E731
    labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return LabelledData(name, pixels(x_train), labels(y_train), pixels(arrays.x_test), labels(arrays.y_test), n_classes)


def cifar10_data(root: str = DEFAULT_ROOT, train_limit: int | None = None) -> LabelledData:
    """CIFAR-10 as images float32 [N, 3, 32, 32] in [0, 1] (not normalised), labels int64, 10
    classes; `train_limit`: the first training images only (the test set is always whole)."""
    return _labelled("cifar10", read_cifar10(root), 10, train_limit)


def cifar100_data(root: str = DEFAULT_ROOT, label: str = "fine", train_limit: int | None = None) -> LabelledData:
    """CIFAR-100 as images float32 [N, 3, 32, 32] in [0, 1] (not normalised), labels int64:
    `label` "fine" (100 classes) or "coarse" (20 superclasses); `train_limit`: the first training
    images only."""
    n_classes = _check_label(label)
    return _labelled("cifar100", read_cifar100_labelled(root, label), n_classes, train_limit)
