"""MNIST-1D, regenerated offline by the mnist1d package: shapes, the caller's random state left
alone, the cache, and the episodes of the learning-rate benchmark."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")

from tasks.datasets.mnist1d import Mnist1dTraining, load_mnist1d  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return load_mnist1d(cache_dir=str(tmp_path_factory.mktemp("mnist1d")))


def test_official_shapes_and_labels(data) -> None:
    assert data["x"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)
    assert sorted(np.unique(data["y"]).tolist()) == list(range(10))


def test_generation_leaves_the_callers_random_state_alone(tmp_path) -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    first = load_mnist1d(cache_dir=str(tmp_path))  # generates (no cache yet)
    assert np.random.rand() == expected_np and random.random() == expected_py
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = load_mnist1d(cache_dir=str(tmp_path))  # from the cache
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_episodes(data) -> None:
    shuffled = Mnist1dTraining(data, steps=200, batch=50, seed=0)
    a, b = shuffled.episode(0), shuffled.episode(1)
    assert a.support_x.shape == (10000, 40) and a.query_x.shape == (1000, 40)
    assert not torch.equal(a.support_y, b.support_y)
    assert torch.equal(a.support_y, shuffled.episode(0).support_y)
    # every epoch is a permutation of the training set
    assert sorted(a.support_y[:4000].tolist()) == sorted(data["y"].tolist())
    fixed = Mnist1dTraining(data, steps=200, batch=50, shuffle=False).episode(7)
    assert torch.equal(fixed.support_x, torch.from_numpy(data["x"]).float())
