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


def mnist1d_pools(n_rows: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), query_fraction: float = 0.5,
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Disjoint row pools of the MNIST-1D *training* set for few-sample episodes: one permutation
    of its `n_rows` rows (fixed by `seed`) cut into train / val / test pools by `fractions`, each
    pool cut again into a support part (its first 1 - `query_fraction`) and a held-out query part.
    {split: (support rows, query rows)}, all disjoint."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ConfigError(f"task.fractions must be three positive shares summing to <= 1, got {list(fractions)}")
    if not 0 < query_fraction < 1:
        raise ConfigError(f"task.query_fraction must be in (0, 1), got {query_fraction}")
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    ends = np.cumsum([round(f * n_rows) for f in fractions]).tolist()
    pools, start = {}, 0
    for split, end in zip(SPLITS, ends):
        rows = order[start:end]
        cut = len(rows) - round(query_fraction * len(rows))
        pools[split], start = (rows[:cut], rows[cut:]), end
    return pools


class Mnist1dEpisodes:
    """Few-sample MNIST-1D classification episodes for meta-learning a loss (or an optimizer):
    episode i trains on `k_train` random rows of this split's support part and is scored on
    `q_query` random rows of its held-out query part (all of it when None), a pure function of
    (seed, split, i). Labels are the ten digits themselves (not permuted): every episode is the
    same 10-way problem from a different small sample, as ordinary training is. Only training-set
    rows are read (`mnist1d_pools`); the MNIST-1D test set never appears."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, support_rows: torch.Tensor, query_rows: torch.Tensor,
                 k_train: int = 300, q_query: int | None = 300, seed: int = 0,
                 split: str = "train") -> None:  # fmt: skip
        if not 1 <= k_train <= len(support_rows):
            raise ConfigError(f"task.k_train must be in [1, {len(support_rows)}] (the {split} pool's support part), "
                              f"got {k_train}")  # fmt: skip
        if q_query is not None and not 1 <= q_query <= len(query_rows):
            raise ConfigError(f"task.q_query must be in [1, {len(query_rows)}] (the {split} pool's query part) or "
                              f"null, got {q_query}")  # fmt: skip
        self.x, self.y, self.support_rows, self.query_rows = x, y, support_rows, query_rows
        self.k_train, self.q_query, self.seed, self.stream = k_train, q_query, seed, SPLITS.index(split)

    def episode(self, index: int) -> Episode:
        g = episode_generator(self.seed, index, self.stream)
        support = self.support_rows[torch.randperm(len(self.support_rows), generator=g)[: self.k_train]]
        query = self.query_rows
        if self.q_query is not None:
            query = query[torch.randperm(len(query), generator=g)[: self.q_query]]
        return Episode(self.x[support], self.y[support], self.x[query], self.y[query])


def mnist1d_episodes_task(k_train: int = 300, q_query: int | None = 300, n_way: int = 10,
                          fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), query_fraction: float = 0.5,
                          split_seed: int = 0, seed: int = 0, cache_dir: str | None = None) -> TaskSplits:  # fmt: skip
    """Few-sample MNIST-1D episodes (`Mnist1dEpisodes`) on disjoint pools of the training set:
    meta-train, meta-validation and meta-test never share a row, and no split reads the test set,
    which stays for judging whatever is meta-learned in ordinary training (`scripts/train.py`).
    `split_seed` fixes the pools, `seed` the episodes."""
    if n_way != 10:
        raise ConfigError(f"MNIST-1D has 10 classes: task.n_way must be 10, got {n_way}")
    data = load_mnist1d(cache_dir)
    x, y = torch.from_numpy(data["x"]).float(), torch.from_numpy(data["y"]).long()
    pools = mnist1d_pools(len(x), tuple(fractions), query_fraction, split_seed)
    samplers = [Mnist1dEpisodes(x, y, *pools[split], k_train, q_query, seed, split) for split in SPLITS]
    return TaskSplits(*samplers, loss="cross_entropy", metric="accuracy")
