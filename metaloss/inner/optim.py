"""Differentiable inner optimizers as pure ``(init, update)`` pairs (the optax shape).

    state = opt.init(params)
    params, state = opt.update(grads, state, params)

Nothing is modified in place, so gradients flow through every update to the
parameters, the optimizer state and the hyperparameters. A hyperparameter may
be a float, a tensor (a meta-parameter that receives gradients), or a mapping
from parameter name to tensor (per-parameter values, e.g. Meta-SGD's
element-wise learning rates of the parameter's shape).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.types import Params

Hyper = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
OptState = dict[str, Any]


class InnerOptimizer(NamedTuple):
    """A pure optimizer. `update(grads, state, params) -> (new_params, new_state)`."""

    init: Callable[[Params], OptState]
    update: Callable[[Params, OptState, Params], tuple[Params, OptState]]


def _value(h: Hyper, name: str) -> float | Tensor:
    return h[name] if isinstance(h, Mapping) else h


def _is_zero(h: Hyper) -> bool:
    return isinstance(h, (int, float)) and h == 0.0


def _check_nonnegative(h: Hyper, what: str) -> None:
    values = h.values() if isinstance(h, Mapping) else [h]
    for v in values:
        if isinstance(v, (int, float)) and v < 0:
            raise ConfigError(f"{what} must be >= 0, got {v}")


def sgd(lr: Hyper, momentum: Hyper = 0.0, weight_decay: Hyper = 0.0, nesterov: bool = False) -> InnerOptimizer:
    """SGD with optional heavy-ball momentum, PyTorch's convention (no dampening).

    g = grad + weight_decay * w;  b = momentum * b + g;  w = w - lr * (g + momentum * b if nesterov else b)
    """
    _check_nonnegative(lr, "inner learning rate")
    _check_nonnegative(momentum, "momentum")
    _check_nonnegative(weight_decay, "weight decay")
    use_momentum = not _is_zero(momentum)
    use_weight_decay = not _is_zero(weight_decay)

    def init(params: Params) -> OptState:
        if not use_momentum:
            return {}
        return {"momentum": {name: torch.zeros_like(p) for name, p in params.items()}}

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        new_params, new_buf = {}, {}
        for name, w in params.items():
            g = grads[name] + _value(weight_decay, name) * w if use_weight_decay else grads[name]
            if use_momentum:
                mu = _value(momentum, name)
                b = mu * state["momentum"][name] + g
                new_buf[name] = b
                g = g + mu * b if nesterov else b
            new_params[name] = w - _value(lr, name) * g
        return new_params, ({"momentum": new_buf} if use_momentum else {})

    return InnerOptimizer(init, update)


def adam(
    lr: Hyper,
    beta1: Hyper = 0.9,
    beta2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    eps_root: float = 1e-12,
) -> InnerOptimizer:
    """Adam (Kingma & Ba, 2015) with bias correction.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  w = w - lr * m_hat / (sqrt(v_hat + eps_root) + eps)
    `eps_root` keeps the derivative of the square root finite where a gradient
    is exactly zero (otherwise second-order gradients become NaN).
    """
    _check_nonnegative(lr, "inner learning rate")
    _check_nonnegative(eps, "eps")

    def init(params: Params) -> OptState:
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return {"step": 0, "m": zeros, "v": dict(zeros)}

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        t = state["step"] + 1
        new_params, new_m, new_v = {}, {}, {}
        for name, w in params.items():
            b1, b2 = _value(beta1, name), _value(beta2, name)
            g = grads[name]
            m = b1 * state["m"][name] + (1 - b1) * g
            v = b2 * state["v"][name] + (1 - b2) * g * g
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            new_params[name] = w - _value(lr, name) * m_hat / (torch.sqrt(v_hat + eps_root) + _value(eps, name))
            new_m[name], new_v[name] = m, v
        return new_params, {"step": t, "m": new_m, "v": new_v}

    return InnerOptimizer(init, update)


def averaged(optimizer: InnerOptimizer, decay: float) -> InnerOptimizer:
    """`optimizer` that also keeps an exponential moving average of the iterates (Polyak & Juditsky
    1992's averaging in its exponential form; the weight averaging of ELR+, Liu et al. 2020), in its
    state under "average", with the warm-up of TensorFlow's ExponentialMovingAverage:

        a_0 = w_0;  a_n = d_n a_{n-1} + (1 - d_n) w_n,  d_n = min(decay, (1 + n) / (10 + n))

    The iterates themselves are `optimizer`'s. The average is a stop-gradient (it is what gets
    evaluated, never differentiated), so it adds no graph to a look-ahead."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ConfigError(f"the averaging decay must be in [0, 1), got {decay!r}")

    def init(params: Params) -> OptState:
        return {"inner": optimizer.init(params), "average": {n: p.detach().clone() for n, p in params.items()},
                "averaged_steps": 0}  # fmt: skip

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        new_params, inner = optimizer.update(grads, state["inner"], params)
        n = state["averaged_steps"] + 1
        d = min(decay, (1 + n) / (10 + n))
        average = {name: d * a + (1 - d) * new_params[name].detach() for name, a in state["average"].items()}
        return new_params, {"inner": inner, "average": average, "averaged_steps": n}

    return InnerOptimizer(init, update)


OPTIMIZERS: dict[str, Callable[..., InnerOptimizer]] = {"sgd": sgd, "adam": adam}
