"""MNIST-1D, regenerated offline by the mnist1d package: shapes, the caller's random state left
alone, the cache, and the episodes of the learning-rate benchmark."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")

from metaloss.errors import ConfigError  # noqa: E402
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


def test_pools_are_disjoint_training_rows_cut_by_their_fractions() -> None:
    from tasks.datasets.mnist1d import mnist1d_pools

    pools = mnist1d_pools(4000, (0.6, 0.2, 0.2), query_fraction=0.5, seed=0)
    sizes = {split: (len(s), len(q)) for split, (s, q) in pools.items()}
    assert sizes == {"train": (1200, 1200), "val": (400, 400), "test": (400, 400)}
    every = torch.cat([rows for pair in pools.values() for rows in pair])
    assert len(set(every.tolist())) == len(every) == 4000 and 0 <= every.min() and every.max() < 4000
    again, other = mnist1d_pools(4000, seed=0), mnist1d_pools(4000, seed=1)
    assert torch.equal(again["val"][1], pools["val"][1]) and not torch.equal(other["val"][1], pools["val"][1])
    with pytest.raises(ConfigError, match="fractions"):
        mnist1d_pools(4000, (0.6, 0.5, 0.2))
    with pytest.raises(ConfigError, match="query_fraction"):
        mnist1d_pools(4000, query_fraction=1.0)


def test_episodes_draw_support_and_query_from_their_own_parts_only() -> None:
    from tasks.datasets.mnist1d import Mnist1dEpisodes, mnist1d_pools

    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)  # [100, 1]: each row carries its index
    y = torch.arange(100) % 10
    pools = mnist1d_pools(100, (0.6, 0.2, 0.2), 0.5, seed=3)
    sampler = Mnist1dEpisodes(x, y, *pools["val"], k_train=7, q_query=5, seed=1, split="val")
    e = sampler.episode(4)
    support, query = e.support_x.squeeze(1).long(), e.query_x.squeeze(1).long()
    assert len(set(support.tolist())) == 7 and len(set(query.tolist())) == 5
    assert set(support.tolist()) <= set(pools["val"][0].tolist())
    assert set(query.tolist()) <= set(pools["val"][1].tolist())
    assert torch.equal(e.support_y, y[support]) and torch.equal(e.query_y, y[query])
    assert torch.equal(sampler.episode(4).support_x, e.support_x)
    assert not torch.equal(sampler.episode(5).support_x, e.support_x)
    whole = Mnist1dEpisodes(x, y, *pools["val"], k_train=7, q_query=None, split="val").episode(0)
    assert sorted(whole.query_x.squeeze(1).long().tolist()) == sorted(pools["val"][1].tolist())
    with pytest.raises(ConfigError, match="k_train"):
        Mnist1dEpisodes(x, y, *pools["val"], k_train=11, split="val")
    with pytest.raises(ConfigError, match="q_query"):
        Mnist1dEpisodes(x, y, *pools["val"], k_train=7, q_query=0, split="val")


def test_episode_task_never_reads_the_test_set(data, tmp_path) -> None:
    from tasks.datasets.mnist1d import mnist1d_episodes_task

    np.save(tmp_path / "unused.npy", np.zeros(1))  # the cache directory may hold other files
    splits = mnist1d_episodes_task(k_train=20, q_query=10, cache_dir=str(tmp_path))
    train_rows = {tuple(r) for r in torch.from_numpy(data["x"]).float().tolist()}  # as the sampler converts them
    test_rows = {tuple(r) for r in torch.from_numpy(data["x_test"]).float().tolist()} - train_rows
    for sampler in (splits.train, splits.val, splits.test):
        e = sampler.episode(0)
        assert e.support_x.shape == (20, 40) and e.query_x.shape == (10, 40)
        seen = {tuple(r) for r in torch.cat([e.support_x, e.query_x]).tolist()}
        assert seen <= train_rows and not seen & test_rows
    with pytest.raises(ConfigError, match="n_way"):
        mnist1d_episodes_task(n_way=5, cache_dir=str(tmp_path))
