"""Labelled datasets for ordinary training (and, later, noisy-label episodes): arrays in, a
minibatch sampler out. Readers stay in `tasks/datasets/`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metaloss.errors import ConfigError, DataNotFoundError
from metaloss.types import Episode
from tasks.base import episode_generator


@dataclass
class LabelledData:
    """x_train [N, d] float, y_train [N] class indices, and the same for the test set."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int

    @property
    def in_features(self) -> int:
        return int(self.x_train[0].numel())


def fashion_mnist_data(root: str = "/usr/share/datasets/fashion-mnist", train_limit: int | None = None,
                       root_key: str = "data.root") -> LabelledData:  # fmt: skip
    """Fashion-MNIST as flat [N, 784] vectors in [0, 1]; `train_limit`: the first rows only; `root_key`:
    the config key that sets `root`, named in the error when the files are missing."""
    from tasks.datasets.fashion_mnist import load_fashion_mnist

    (xs, ys), (xt, yt) = load_fashion_mnist(root, "train", root_key), load_fashion_mnist(root, "test", root_key)
    xs, ys = (xs, ys) if train_limit is None else (xs[:train_limit], ys[:train_limit])
    flat = lambda a: torch.from_numpy(a.reshape(len(a), -1).astype("float32") / 255.0)  # noqa: E731
    return LabelledData("fashion_mnist", flat(xs), torch.from_numpy(ys), flat(xt), torch.from_numpy(yt), 10)


def mnist1d_data(cache_dir: str | None = None) -> LabelledData:
    """MNIST-1D: [4000, 40] training and [1000, 40] test sequences, 10 classes."""
    from tasks.datasets.mnist1d import load_mnist1d

    d = load_mnist1d(cache_dir)
    f = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return LabelledData("mnist1d", f(d["x"]), torch.from_numpy(d["y"]).long(), f(d["x_test"]),
                        torch.from_numpy(d["y_test"]).long(), 10)  # fmt: skip


def digits_data(test_fraction: float = 0.25, seed: int = 0) -> LabelledData:
    """scikit-learn's handwritten digits (bundled with it, no download): 1,797 8x8 images as flat
    [N, 64] vectors in [0, 1] (pixel counts 0..16 divided by 16), 10 classes, split into training
    and test rows stratified by class, the split fixed by `seed`."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataNotFoundError("the digits data needs scikit-learn: pip install scikit-learn") from None
    x, y = load_digits(return_X_y=True)
    train, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    xs, ys = torch.from_numpy(x.astype("float32") / 16.0), torch.from_numpy(y).long()
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return LabelledData("digits", xs[train], ys[train], xs[test], ys[test], 10)


class MinibatchSampler:
    """Minibatch `i` of ordinary training as an episode (support = query = the batch): epochs are
    permutations drawn from (seed, epoch), so batch i is a pure function of (seed, i) and a resumed
    run reads the same batches."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1 or batch_size > len(x):
            raise ConfigError(f"batch_size must be in [1, {len(x)}], got {batch_size}")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.per_epoch = len(x) // batch_size  # the last incomplete batch of an epoch is dropped

    def episode(self, index: int) -> Episode:
        epoch, k = divmod(index, self.per_epoch)
        order = torch.randperm(len(self.x), generator=episode_generator(self.seed, epoch))
        rows = order[k * self.batch_size : (k + 1) * self.batch_size]
        return Episode(self.x[rows], self.y[rows], self.x[rows], self.y[rows])
