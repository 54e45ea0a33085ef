"""Shared test helpers: a tiny mini-ImageNet in the official pickled-cache format."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# tests/tasks must never shadow the `tasks` package when tests/ itself lands on sys.path
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MINI_FILES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def mini_pixel(split: str, class_index: int, channel: int) -> int:
    """The value every pixel of `channel` holds in an image of `class_index` (in insertion order) of `split`."""
    return 80 * SPLIT_CODE[split] + 8 * class_index + channel


def write_miniimagenet(root: Path, n_classes: int = 6, per_class: int = 3, size: int = 84) -> dict[str, dict]:
    """Write mini-imagenet-cache-{train,validation,test}.pkl into `root` and return what was pickled.

    Each file is {'image_data': uint8 [N, size, size, 3], 'class_dict': name -> list of row indices}.
    Rows of different classes are interleaved and class names do not sort in insertion order, so a
    reader has to follow class_dict. Every pixel encodes (split, class, channel), see `mini_pixel`.
    """
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, filename in MINI_FILES.items():
        images = np.empty((n_classes * per_class, size, size, 3), dtype=np.uint8)
        class_dict = {}
        for k in range(n_classes):
            rows = [k + n_classes * j for j in range(per_class)]
            for c in range(3):
                images[rows, :, :, c] = mini_pixel(split, k, c)
            class_dict[f"n{SPLIT_CODE[split]}{(n_classes - k):07d}"] = rows  # reverse-sorted names
        data = {"image_data": images, "class_dict": class_dict}
        with open(root / filename, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        written[split] = data
    return written


@pytest.fixture(scope="session")
def make_miniimagenet():
    """`write_miniimagenet`, for tests and fixtures of any scope."""
    return write_miniimagenet


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    """A directory with a tiny mini-ImageNet: 6 classes x 3 images of 84 x 84 in every split."""
    root = tmp_path / "miniimagenet"
    write_miniimagenet(root)
    return root
