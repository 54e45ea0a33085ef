"""Ordinary-training data of tasks/classification.py: scikit-learn's bundled digits (the values,
the stratified split, its seed, bad arguments)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402

from metaloss.errors import ConfigError  # noqa: E402
from tasks.classification import digits_data  # noqa: E402


def test_digits_are_the_bundled_images_scaled_to_unit_range_and_split_by_class() -> None:
    x_all, y_all = load_digits(return_X_y=True)
    data = digits_data(test_fraction=0.25, seed=0)
    assert data.n_classes == 10 and data.x_train.shape[1] == 64 and data.x_train.dtype == torch.float32
    assert len(data.x_train) + len(data.x_test) == len(x_all) == 1797
    assert len(data.x_test) == math.ceil(0.25 * 1797)  # scikit-learn rounds the test share up
    assert 0 <= float(data.x_train.min()) and float(data.x_train.max()) == 1.0  # pixel counts 0..16 / 16
    # train + test is a partition of the bundled (image, label) pairs: every pair once
    bundled = Counter((tuple(x.astype(int).tolist()), int(y)) for x, y in zip(x_all, y_all))
    split = Counter((tuple((16 * x).round().int().tolist()), int(y))
                    for xs, ys in ((data.x_train, data.y_train), (data.x_test, data.y_test))
                    for x, y in zip(xs, ys))  # fmt: skip
    assert split == bundled
    # stratified: each class's share of the test split is within one image of its share overall
    counts = np.bincount(y_all, minlength=10)
    test_counts = torch.bincount(data.y_test, minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.25 * counts) <= 1)


def test_the_split_is_fixed_by_its_seed() -> None:
    a, b, c = digits_data(seed=0), digits_data(seed=0), digits_data(seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_test, c.x_test)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_a_bad_test_fraction_is_a_config_error(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        digits_data(test_fraction=fraction)
