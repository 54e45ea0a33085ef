"""The Fashion-MNIST reader on tiny files in the official idx format (plain and gzipped); the real
files of the Debian package when they are installed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.datasets.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist, read_idx


def idx_bytes(array: np.ndarray, kind: int = 0x08) -> bytes:
    """An idx file: 0, 0, type, ndim, big-endian int32 sizes, the bytes row-major."""
    return bytes([0, 0, kind, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_reads_both_splits_exactly(tmp_path, gz, make_fashion_mnist_split):
    train = make_fashion_mnist_split(tmp_path, "train", 7, gz, seed=1)
    test = make_fashion_mnist_split(tmp_path, "t10k", 3, gz, seed=2)
    for split, (images, labels) in (("train", train), ("test", test)):
        got_images, got_labels = load_fashion_mnist(tmp_path, split)
        assert got_images.dtype == np.uint8 and got_images.shape == (len(labels), 28, 28)
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
        assert got_labels.dtype == np.int64


def test_bad_files_are_one_line_errors(tmp_path, make_fashion_mnist_split):
    images, labels = make_fashion_mnist_split(tmp_path, "train", 4, gz=False)
    name = "train-images-idx3-ubyte"
    good = (tmp_path / name).read_bytes()
    cases = {
        good[:-5]: "has 3131 data bytes but its header [4, 28, 28] says 3136",
        good[:10]: "is truncated: its header needs 16 bytes",
        b"\x01\x02" + good[2:]: "is not an idx file",
        good[:2] + b"\x0d" + good[3:]: "holds idx type 0x0d",
    }
    for content, message in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
            load_fashion_mnist(tmp_path, "train")
        assert len(str(err.value).splitlines()) == 1
    (tmp_path / name).write_bytes(idx_bytes(images[:3]))
    with pytest.raises(ConfigError, match="holds 3 images but train-labels-idx1-ubyte 4 labels"):
        load_fashion_mnist(tmp_path, "train")
    (tmp_path / name).unlink()
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(good)[:40])
    with pytest.raises(ConfigError, match="cannot be read as an idx file"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(DataNotFoundError, match="missing t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte .*root=DIR"):
        load_fashion_mnist(tmp_path, "test")
    (tmp_path / "three-dims").write_bytes(idx_bytes(images))
    with pytest.raises(ConfigError, match="has 3 dimensions, expected 1"):
        read_idx(tmp_path / "three-dims", dims=1)


@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="the Debian package dataset-fashion-mnist is not installed")
def test_the_official_files():
    images, labels = load_fashion_mnist(DEFAULT_ROOT, "test")
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
