"""Fashion-MNIST (Xiao et al. 2017) from its official idx files, plain or gzipped:
`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
`t10k-labels-idx1-ubyte` (each optionally `.gz`). The Debian package `dataset-fashion-mnist`
installs them under /usr/share/datasets/fashion-mnist/ (the default root).

idx format (LeCun's MNIST page): a big-endian header, two zero bytes, a type code (0x08: unsigned
bytes), the number of dimensions d, then d big-endian int32 sizes, then the data row-major. A file
with another type, a size that does not match its header, or images and labels of different
counts is refused in one line.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from metaloss.errors import ConfigError, DataNotFoundError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | Path, dims: int | None = None) -> np.ndarray:
    """The unsigned-byte array of an idx file (gzipped when its name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # e.g. a truncated gzip stream
        raise ConfigError(f"{path} cannot be read as an idx file: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ConfigError(f"{path} is not an idx file (its first two bytes must be zero)")
    kind, ndim = data[2], data[3]
    if kind != 0x08:
        raise ConfigError(f"{path} holds idx type 0x{kind:02x}; Fashion-MNIST files hold unsigned bytes (0x08)")
    if dims is not None and ndim != dims:
        raise ConfigError(f"{path} has {ndim} dimensions, expected {dims}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"{path} is truncated: its header needs {header} bytes, the file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise ConfigError(f"{path} has {len(data) - header} data bytes but its header {list(shape)} says {expected}"
                          " (truncated or corrupt)")  # fmt: skip
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(root: str | Path = DEFAULT_ROOT, split: str = "train",
                       root_key: str = "root") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(images uint8 [N, 28, 28], labels int64 [N]) of `split` ("train": 60,000, "test": 10,000)."""
    if split not in FILES:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(FILES)}")
    root = Path(root).expanduser()
    paths = [_find(root, name) for name in FILES[split]]
    missing = [name for name, path in zip(FILES[split], paths) if path is None]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {root.resolve()}: missing {', '.join(missing)} (or .gz); set {root_key}=DIR "
            "(the Debian package dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist)"
        )
    images, labels = read_idx(paths[0], dims=3), read_idx(paths[1], dims=1)
    if len(images) != len(labels):
        raise ConfigError(f"{paths[0].name} holds {len(images)} images but {paths[1].name} {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise ConfigError(f"{paths[1]} has label {int(labels.max())}; Fashion-MNIST has {len(CLASSES)} classes")
    return images, labels.astype(np.int64)
