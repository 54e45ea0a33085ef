"""SinusoidSampler and sinusoid_task: determinism, ranges, the generating function, statistics;
ShapedSineSampler and shaped_sine_task (ML3's shaped sine)."""

from __future__ import annotations

import math

import pytest
import torch

from metaloss.errors import ConfigError
from tasks.base import SPLITS, TaskSampler
from tasks.synthetic import ShapedSineSampler, SinusoidSampler, shaped_sine_task, sinusoid_task

# E[A^2] / 2 for A ~ U[0.1, 5]: the zero predictor's expected query MSE (E[sin^2] = 1/2 since the
# phase is uniform over a whole period of sin^2).
ZERO_PREDICTOR_MSE = (5.0**3 - 0.1**3) / (3 * 4.9) / 2


def tensors(sampler: SinusoidSampler, index: int) -> tuple[torch.Tensor, ...]:
    e = sampler.episode(index)
    return e.support_x, e.support_y, e.query_x, e.query_y


def test_is_a_task_sampler():
    assert isinstance(SinusoidSampler(), TaskSampler)


def test_same_seed_and_index_give_identical_episodes():
    a, b = SinusoidSampler(seed=3), SinusoidSampler(seed=3)
    for index in (0, 1, 17, 10_000):
        for x, y in zip(tensors(a, index), tensors(b, index)):
            assert torch.equal(x, y)
        assert a.episode(index).meta == b.episode(index).meta
    # random access: reading out of order or repeatedly does not change an episode
    first = tensors(a, 5)
    a.episode(99), a.episode(4)
    assert all(torch.equal(x, y) for x, y in zip(first, tensors(a, 5)))


@pytest.mark.parametrize(
    "other",
    [
        lambda: SinusoidSampler(seed=3).episode(1),  # another index
        lambda: SinusoidSampler(seed=4).episode(0),  # another seed
        lambda: SinusoidSampler(seed=3, split="val").episode(0),  # another split
        lambda: SinusoidSampler(seed=3, split="test").episode(0),
    ],
    ids=["index", "seed", "split-val", "split-test"],
)
def test_different_index_seed_or_split_gives_a_different_episode(other):
    base, e = SinusoidSampler(seed=3).episode(0), other()
    assert base.meta["amplitude"] != e.meta["amplitude"]
    assert base.meta["phase"] != e.meta["phase"]
    assert not torch.equal(base.support_x, e.support_x)
    assert not torch.equal(base.query_x, e.query_x)


def test_shapes_and_dtypes():
    e = SinusoidSampler(k_support=7, k_query=13).episode(0)
    assert e.support_x.shape == e.support_y.shape == (7, 1)
    assert e.query_x.shape == e.query_y.shape == (13, 1)
    assert all(t.dtype == torch.float32 for t in (e.support_x, e.support_y, e.query_x, e.query_y))
    assert set(e.meta) == {"amplitude", "phase"}


def test_support_and_query_points_are_different_draws():
    e = SinusoidSampler(k_support=10, k_query=10).episode(0)
    assert not torch.equal(e.support_x, e.query_x)
    assert len(set(torch.cat([e.support_x, e.query_x]).flatten().tolist())) == 20


def test_parameters_and_inputs_lie_in_their_ranges():
    sampler = SinusoidSampler(k_support=5, k_query=5)
    episodes = [sampler.episode(i) for i in range(300)]
    amps = torch.tensor([e.meta["amplitude"] for e in episodes])
    phases = torch.tensor([e.meta["phase"] for e in episodes])
    xs = torch.cat([torch.cat([e.support_x, e.query_x]) for e in episodes])
    assert amps.min() >= 0.1 and amps.max() <= 5.0
    assert phases.min() >= 0.0 and phases.max() <= math.pi
    assert xs.min() >= -5.0 and xs.max() <= 5.0
    # and they fill those ranges rather than a corner of them
    assert amps.min() < 0.5 and amps.max() > 4.5
    assert phases.min() < 0.3 and phases.max() > math.pi - 0.3
    assert xs.min() < -4.9 and xs.max() > 4.9


def test_custom_ranges_are_respected():
    sampler = SinusoidSampler(amplitude=(2.0, 2.0), phase=(0.5, 0.5), x_range=(0.0, 1.0))
    for i in range(20):
        e = sampler.episode(i)
        assert e.meta["amplitude"] == pytest.approx(2.0)
        assert e.meta["phase"] == pytest.approx(0.5)
        assert e.support_x.min() >= 0.0 and e.support_x.max() <= 1.0


def test_targets_are_amplitude_times_shifted_sine():
    sampler = SinusoidSampler(seed=11)
    for i in range(50):
        e = sampler.episode(i)
        a, p = e.meta["amplitude"], e.meta["phase"]
        torch.testing.assert_close(e.support_y, a * torch.sin(e.support_x - p), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e.query_y, a * torch.sin(e.query_x - p), atol=1e-5, rtol=1e-5)


def test_zero_predictor_mse_matches_theory():
    assert ZERO_PREDICTOR_MSE == pytest.approx(4.2517, abs=1e-4)
    sampler = SinusoidSampler(k_support=1, k_query=10, seed=0)
    n = 2000
    per_task = torch.tensor([sampler.episode(i).query_y.pow(2).mean().item() for i in range(n)], dtype=torch.float64)
    stderr = per_task.std().item() / math.sqrt(n)
    assert 0.02 < stderr < 0.15  # the tolerance below is a few standard errors, not a loose constant
    assert abs(per_task.mean().item() - ZERO_PREDICTOR_MSE) < 4 * stderr


def test_sinusoid_task_splits_are_distinct_streams():
    splits = sinusoid_task(k_support=5, k_query=5, seed=0)
    assert splits.loss == "mse" and splits.metric is None
    samplers = {name: getattr(splits, name) for name in SPLITS}
    amps = {name: {round(s.episode(i).meta["amplitude"], 6) for i in range(100)} for name, s in samplers.items()}
    assert all(len(a) == 100 for a in amps.values())
    assert not amps["train"] & amps["val"]
    assert not amps["train"] & amps["test"]
    assert not amps["val"] & amps["test"]
    # each split is its sampler with the split's stream: same seed, same stream -> same tasks
    for name, sampler in samplers.items():
        assert sampler.k_support == 5 and sampler.k_query == 5
        again = SinusoidSampler(5, 5, seed=0, split=name).episode(3)
        assert torch.equal(sampler.episode(3).query_x, again.query_x)


def test_sinusoid_task_seed_changes_every_split():
    a, b = sinusoid_task(seed=0), sinusoid_task(seed=1)
    for name in SPLITS:
        assert getattr(a, name).episode(0).meta != getattr(b, name).episode(0).meta


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k_support": 0},
        {"k_query": 0},
        {"k_support": -3},
        {"split": "validation"},
        {"amplitude": (5.0, 0.1)},
        {"phase": (1.0, 0.0)},
        {"x_range": (5.0, -5.0)},
    ],
    ids=str,
)
def test_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        SinusoidSampler(**kwargs)


def test_sinusoid_task_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="k_support"):
        sinusoid_task(k_support=0)


def test_shaped_sine_is_a_deterministic_task_sampler():
    assert isinstance(ShapedSineSampler(), TaskSampler)
    for split in SPLITS:
        a, b = ShapedSineSampler(seed=3, split=split), ShapedSineSampler(seed=3, split=split)
        for index in (0, 1, 17, 10_000):
            ea, eb = a.episode(index), b.episode(index)
            for x, y in zip((ea.support_x, ea.support_y, ea.query_x, ea.query_y),
                            (eb.support_x, eb.support_y, eb.query_x, eb.query_y)):  # fmt: skip
                assert torch.equal(x, y)
            assert ea.meta["frequency"] == eb.meta["frequency"]
            assert torch.equal(ea.meta["target_params"]["frequency"], eb.meta["target_params"]["frequency"])
    assert ShapedSineSampler(seed=3).episode(0).meta != ShapedSineSampler(seed=4).episode(0).meta
    assert ShapedSineSampler(seed=3).episode(0).meta != ShapedSineSampler(seed=3).episode(1).meta


def test_shaped_sine_shapes_ranges_and_targets():
    sampler = ShapedSineSampler(seed=0)
    thetas = []
    for i in range(100):
        e = sampler.episode(i)
        assert e.support_x.shape == e.support_y.shape == (64, 1)
        assert e.query_x.shape == e.query_y.shape == (64, 1)
        theta = e.meta["target_params"]["frequency"]
        assert theta.shape == (1,) and theta.item() == pytest.approx(e.meta["frequency"])
        assert -5 <= theta.item() <= 5
        assert e.support_x.abs().max() <= 5 and e.query_x.abs().max() <= 5
        torch.testing.assert_close(e.support_y, torch.sin(theta * e.support_x))
        torch.testing.assert_close(e.query_y, torch.sin(theta * e.query_x))
        assert not torch.equal(e.support_x, e.query_x)
        thetas.append(theta.item())
    assert min(thetas) < -3 and max(thetas) > 3  # spread over U[-5, 5], both signs
    small = ShapedSineSampler(k_support=5, k_query=7, frequency=(1.0, 2.0), x_range=(0.0, 1.0)).episode(0)
    assert small.support_x.shape == (5, 1) and small.query_x.shape == (7, 1)
    assert 1 <= small.meta["frequency"] <= 2 and 0 <= small.support_x.min() and small.support_x.max() <= 1


def test_shaped_sine_task_splits_are_distinct_streams():
    splits = shaped_sine_task(seed=0)
    assert splits.loss == "mse" and splits.metric is None
    samplers = {name: getattr(splits, name) for name in SPLITS}
    thetas = {name: {round(s.episode(i).meta["frequency"], 6) for i in range(100)} for name, s in samplers.items()}
    assert all(len(t) == 100 for t in thetas.values())
    assert not thetas["train"] & thetas["val"]
    assert not thetas["train"] & thetas["test"]
    assert not thetas["val"] & thetas["test"]
    for name, sampler in samplers.items():
        assert sampler.k_support == 64 and sampler.k_query == 64
        again = ShapedSineSampler(seed=0, split=name).episode(3)
        assert torch.equal(sampler.episode(3).support_x, again.support_x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k_support": 0},
        {"k_query": 0},
        {"split": "validation"},
        {"frequency": (5.0, -5.0)},
        {"frequency": (0.0, float("inf"))},
        {"frequency": (1.0,)},
        {"x_range": (5.0, -5.0)},
        {"x_range": (float("nan"), 1.0)},
    ],
    ids=str,
)
def test_shaped_sine_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        ShapedSineSampler(**kwargs)
    if "split" not in kwargs:
        with pytest.raises(ConfigError):
            shaped_sine_task(**kwargs)
