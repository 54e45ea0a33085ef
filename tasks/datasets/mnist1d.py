"""MNIST-1D (Greydanus 2020): 4,000 training and 1,000 test sequences of length 40, 10 classes,
regenerated offline by the `mnist1d` package (`pip install mnist1d`, the `data` extra) with its
official arguments. Never its `get_dataset()`, which tries to download and writes a pickle into
the working directory. `make_dataset` reseeds numpy's and Python's global generators: their
states are restored afterwards, so the caller's randomness is untouched.
"""

from __future__ import annotations

import importlib.metadata
import random

import numpy as np
import torch

from metaloss.errors import ConfigError, DataNotFoundError
from metaloss.types import Episode
from tasks.base import SPLITS, TaskSplits, episode_generator
from tasks.datasets.common import cache_file, cached_arrays, user_cache_dir


def generate_mnist1d() -> dict[str, np.ndarray]:
    """The official MNIST-1D arrays: x [4000, 40], y [4000], x_test [1000, 40], y_test [1000]."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataNotFoundError("MNIST-1D needs the mnist1d package: pip install mnist1d") from None
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def load_mnist1d(cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """The arrays, from a cache (`~/.cache/metaloss/mnist1d` by default) after the first run."""
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = "missing"
    path = cache_file(user_cache_dir("mnist1d") if cache_dir is None else cache_dir, f"mnist1d_{version}.npz")
    return cached_arrays(path, generate_mnist1d)


class Mnist1dTraining:
    """Episodes for meta-learning training hyperparameters: the support set is the training set
    shuffled anew every epoch and cut to `steps * batch` rows (inner step t reads rows
    [t * batch, (t + 1) * batch)); the query set is the test set. The order depends on (seed,
    split, index); with `shuffle=False` every episode is the training set in its stored order
    (minibatches wrap around it), as in the MNIST-1D paper's learning-rate notebook."""

    def __init__(
        self,
        data: dict[str, np.ndarray],
        steps: int = 200,
        batch: int = 50,
        seed: int = 0,
        split: str = "train",
        shuffle: bool = True,
    ) -> None:
        if steps < 1 or batch < 1:
            raise ConfigError(f"need steps >= 1 and batch >= 1, got {steps} and {batch}")
        self.x, self.y = torch.from_numpy(data["x"]).float(), torch.from_numpy(data["y"]).long()
        self.x_test, self.y_test = torch.from_numpy(data["x_test"]).float(), torch.from_numpy(data["y_test"]).long()
        self.rows, self.seed, self.stream, self.shuffle = steps * batch, seed, SPLITS.index(split), shuffle

    def episode(self, index: int) -> Episode:
        if not self.shuffle:
            return Episode(self.x, self.y, self.x_test, self.y_test)
        g = episode_generator(self.seed, index, self.stream)
        epochs = -(-self.rows // len(self.x))
        order = torch.cat([torch.randperm(len(self.x), generator=g) for _ in range(epochs)])[: self.rows]
        return Episode(self.x[order], self.y[order], self.x_test, self.y_test)


def mnist1d_task(
    steps: int = 200, batch: int = 50, seed: int = 0, shuffle: bool = True, cache_dir: str | None = None
) -> TaskSplits:
    """MNIST-1D training runs as episodes (train / val / test differ only in the shuffling stream)."""
    data = load_mnist1d(cache_dir)
    samplers = [Mnist1dTraining(data, steps, batch, seed, split, shuffle) for split in SPLITS]
    return TaskSplits(*samplers, loss="cross_entropy", metric="accuracy")
