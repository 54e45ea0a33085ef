"""Meta-learned inner optimizers build the right pure optimizer from their parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaloss.errors import ConfigError
from metaloss.meta import HyperparameterOptimizer, LearnedInit, MetaSGD, PerStepSGD


def test_fixed_hyperparameters_are_not_meta_parameters() -> None:
    opt = HyperparameterOptimizer("sgd", lr=0.1, momentum=0.9)
    assert list(opt.parameters()) == []
    params = {"w": torch.ones(2)}
    inner = opt()
    new, state = inner.update({"w": torch.ones(2)}, inner.init(params), params)
    torch.testing.assert_close(new["w"], torch.full((2,), 0.9))


def test_learned_hyperparameters_are_parameters_with_their_start_values() -> None:
    opt = HyperparameterOptimizer("adam", lr=0.01, beta1=0.8, learn=["lr", "beta1"])
    values = {name: p.item() for name, p in opt.named_parameters()}
    assert values == pytest.approx({"learned.lr": 0.01, "learned.beta1": 0.8})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "rmsprop", "lr": 0.1},
        {"name": "sgd", "lr": -0.1},
        {"name": "sgd", "lr": 0.1, "learn": ["momentum"]},
        {"name": "sgd", "lr": 0.1, "betas": 3},
    ],
)
def test_bad_optimizer_configs_are_rejected(kwargs) -> None:
    with pytest.raises(ConfigError):
        HyperparameterOptimizer(**kwargs)


def test_metasgd_has_one_rate_per_element() -> None:
    model = nn.Linear(3, 2)
    opt = MetaSGD(model, lr=0.05)
    shapes = sorted(tuple(p.shape) for p in opt.parameters())
    assert shapes == [(2,), (2, 3)]
    with torch.no_grad():
        opt.lrs["weight"][0, 0] = 1.0
    params = dict(model.named_parameters())
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    new, _ = opt().update(grads, {}, params)
    assert new["weight"][0, 0].item() == pytest.approx(params["weight"][0, 0].item() - 1.0)
    assert new["weight"][1, 1].item() == pytest.approx(params["weight"][1, 1].item() - 0.05)
    with pytest.raises(ConfigError):
        MetaSGD(model, lr=-1.0)


def test_per_step_rates_move_each_tensor_by_its_own_rate_of_the_step() -> None:
    model = nn.Linear(3, 2)
    opt = PerStepSGD(model, steps=2, lr=0.05)
    assert sorted(tuple(p.shape) for p in opt.parameters()) == [(2,), (2,)]  # per tensor, per step
    with torch.no_grad():
        opt.lrs["weight"].copy_(torch.tensor([1.0, 2.0]))
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    inner = opt()
    state = inner.init(params)
    for t, rate in enumerate([1.0, 2.0, 2.0]):  # after the learned steps: the last step's rate
        new, state = inner.update(grads, state, params)
        torch.testing.assert_close(new["weight"], params["weight"] - rate)
        torch.testing.assert_close(new["bias"], params["bias"] - 0.05)
        assert state == {"t": t + 1}
    with pytest.raises(ConfigError):
        PerStepSGD(model, steps=0)


def test_learned_init_returns_the_models_own_parameters() -> None:
    model = nn.Linear(2, 1)
    w0 = LearnedInit(model)()
    assert w0["weight"] is model.weight and w0["bias"] is model.bias
