"""Synthetic task families."""

from __future__ import annotations

import math

import torch

from metaloss.errors import ConfigError
from metaloss.types import Episode
from tasks.base import SPLITS, TaskSplits, episode_generator


class SinusoidSampler:
    """Sinusoid regression of MAML (Finn et al. 2017, sec. 5.1).

    y = A sin(x - p), A ~ U[0.1, 5.0], p ~ U[0, pi], x ~ U[-5, 5];
    K support points and a separate set of query points from the same task.
    The zero predictor's expected MSE is E[A^2]/2 = (5^3 - 0.1^3) / (3 * 4.9) / 2 = 4.25.
    """

    def __init__(
        self,
        k_support: int = 10,
        k_query: int = 10,
        seed: int = 0,
        split: str = "train",
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        if k_support < 1 or k_query < 1:
            raise ConfigError(f"k_support and k_query must be >= 1, got {k_support} and {k_query}")
        for name, (lo, hi) in {"amplitude": amplitude, "phase": phase, "x_range": x_range}.items():
            if lo > hi:
                raise ConfigError(f"sinusoid {name} range is empty: [{lo}, {hi}]")
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.k_support, self.k_query, self.seed, self.stream = k_support, k_query, seed, SPLITS.index(split)
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def episode(self, index: int) -> Episode:
        g = episode_generator(self.seed, index, self.stream)

        def uniform(lo_hi: tuple[float, float], *shape: int) -> torch.Tensor:
            lo, hi = lo_hi
            return lo + (hi - lo) * torch.rand(*shape, generator=g)

        amp, phase = uniform(self.amplitude, 1), uniform(self.phase, 1)
        x = uniform(self.x_range, self.k_support + self.k_query, 1)  # [K + Q, 1]
        y = amp * torch.sin(x - phase)  # [K + Q, 1]
        k = self.k_support
        return Episode(x[:k], y[:k], x[k:], y[k:], {"amplitude": amp.item(), "phase": phase.item()})


def sinusoid_task(k_support: int = 10, k_query: int = 10, seed: int = 0) -> TaskSplits:
    """The sinusoid family with independent train / val / test task streams (held-out tasks)."""
    return TaskSplits(*(SinusoidSampler(k_support, k_query, seed=seed, split=split) for split in SPLITS), loss="mse")


class ShapedSineSampler:
    """ML3's shaped-sine regression (Bechtle et al. 2021, "Meta Learning via Learned Loss"; official
    code `ml3/ml3_train.py: meta_train_shaped_sine`): y = sin(theta* x), theta* ~ U[-5, 5],
    x ~ U[-5, 5], for the one-parameter model `metaloss.models.ShapedSine`. The task's true
    parameter is in `meta["target_params"]` ({"frequency": tensor([theta*])}), for
    `meta_objective="target_params"`: the meta-objective (theta - theta*)^2; `meta["frequency"]`
    is theta* as a float. K support points (64 in ML3) and a separate set of query points."""

    def __init__(
        self,
        k_support: int = 64,
        k_query: int = 64,
        seed: int = 0,
        split: str = "train",
        frequency: tuple[float, float] = (-5.0, 5.0),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        if k_support < 1 or k_query < 1:
            raise ConfigError(f"k_support and k_query must be >= 1, got {k_support} and {k_query}")
        for name, lo_hi in {"frequency": frequency, "x_range": x_range}.items():
            if len(lo_hi) != 2 or not all(math.isfinite(v) for v in lo_hi) or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"shaped-sine {name} must be a finite range [lo, hi], lo <= hi, got {list(lo_hi)}")
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.k_support, self.k_query, self.seed, self.stream = k_support, k_query, seed, SPLITS.index(split)
        self.frequency = (float(frequency[0]), float(frequency[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))

    def episode(self, index: int) -> Episode:
        g = episode_generator(self.seed, index, self.stream)

        def uniform(lo_hi: tuple[float, float], *shape: int) -> torch.Tensor:
            lo, hi = lo_hi
            return lo + (hi - lo) * torch.rand(*shape, generator=g)

        theta = uniform(self.frequency, 1)  # [1]
        x = uniform(self.x_range, self.k_support + self.k_query, 1)  # [K + Q, 1]
        y = torch.sin(theta * x)  # [K + Q, 1]
        k = self.k_support
        meta = {"frequency": theta.item(), "target_params": {"frequency": theta.clone()}}
        return Episode(x[:k], y[:k], x[k:], y[k:], meta)


def shaped_sine_task(
    k_support: int = 64,
    k_query: int = 64,
    seed: int = 0,
    frequency: tuple[float, float] = (-5.0, 5.0),
    x_range: tuple[float, float] = (-5.0, 5.0),
) -> TaskSplits:
    """ML3's shaped-sine family with independent train / val / test task streams (held-out tasks)."""
    samplers = (
        ShapedSineSampler(k_support, k_query, seed=seed, split=split, frequency=frequency, x_range=x_range)
        for split in SPLITS
    )
    return TaskSplits(*samplers, loss="mse")


class InfluenceBalancing:
    """The influence-balancing task (Tallec & Ollivier 2017; PES, Vicol et al. 2021, sec. 5.1), a
    `metaloss.online.TruncatedSystem`: s_{t+1} = A s_t + theta * c, A = 0.5 I + 0.5 superdiagonal,
    c = (+1 x `positive`, -1 x rest), s_0 = 1, per-step loss 0.5 (s_t[0] - 1)^2. theta's short-term
    influence on s[0] is positive, its long-term influence negative (steady state s[0] =
    2 theta (2 positive - n)), so truncations shorter than `positive` steps push theta the wrong way.
    phi = [theta] (a scalar; [P] per particle)."""

    def __init__(self, n: int = 23, positive: int = 10, horizon: int = 1000) -> None:
        if not 0 < positive <= n or horizon < 1:
            raise ConfigError(f"need 0 < positive <= n and horizon >= 1, got {positive}, {n}, {horizon}")
        self.n, self.horizon = n, horizon
        self.signs = torch.cat([torch.ones(positive), -torch.ones(n - positive)]).double()  # [n]

    def init(self, particles: int) -> dict:
        return {"s": torch.ones(particles, self.n, dtype=torch.float64), "t": 0}

    def unroll(self, state: dict, phi: list[torch.Tensor], steps: int) -> tuple[dict, torch.Tensor]:
        (theta,) = phi  # [P]
        s, push = state["s"], theta.reshape(-1, 1) * self.signs  # [P, n], [P, n]
        losses = []
        for _ in range(steps):
            shifted = torch.cat([s[:, 1:], torch.zeros_like(s[:, :1])], dim=1)  # superdiagonal: s_{i+1}
            s = 0.5 * s + 0.5 * shifted + push
            losses.append(0.5 * (s[:, 0] - 1.0) ** 2)
        return {"s": s, "t": state["t"] + steps}, torch.stack(losses).mean(0)


class LinearQuadraticSystem:
    """A linear dynamical system with a quadratic loss, a `metaloss.online.TruncatedSystem` on which
    ES, PES and ES-Single are exactly unbiased: s_{t+1} = a s_t + theta, s_0 = 0, per-step loss
    0.5 ||s_t - target||^2; phi = [theta] of shape [d]."""

    def __init__(self, d: int = 3, a: float = 0.5, horizon: int = 100, seed: int = 0) -> None:
        if d < 1 or horizon < 1:
            raise ConfigError(f"need d >= 1 and horizon >= 1, got {d}, {horizon}")
        self.a, self.horizon = a, horizon
        self.target = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def init(self, particles: int) -> dict:
        return {"s": torch.zeros(particles, len(self.target), dtype=torch.float64), "t": 0}

    def unroll(self, state: dict, phi: list[torch.Tensor], steps: int) -> tuple[dict, torch.Tensor]:
        (theta,) = phi  # [P, d]
        s, losses = state["s"], []
        for _ in range(steps):
            s = self.a * s + theta
            losses.append(0.5 * ((s - self.target) ** 2).sum(-1))
        return {"s": s, "t": state["t"] + steps}, torch.stack(losses).mean(0)


class LearningRateSchedule2D:
    """The toy 2D regression of PES (Vicol et al. 2021, sec. 5.1, fig. 3), a
    `metaloss.online.TruncatedSystem`: SGD on x in R^2 from x_0 = (1, 1) for `horizon` steps on

        f(x) = sqrt(x_0^2 + 5) - sqrt(5) + sin(x_1)^2 exp(-5 x_0^2) + 0.25 |x_1 - 100|,

    with the learning rate a linear schedule between two log-rates, phi = [theta], theta = (log
    initial lr, log final lr): lr_t = exp(theta_0) (T - t) / T + exp(theta_1) t / T. The per-step
    loss is f(x_{t+1}); the meta-objective is its mean over the inner problem. The sin^2 ripples
    trap small learning rates, large ones overshoot in x_0: a short truncation sees only the
    first part of the schedule, which biases truncated backpropagation."""

    def __init__(self, horizon: int = 100) -> None:
        if horizon < 1:
            raise ConfigError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon

    @staticmethod
    def loss(x: torch.Tensor) -> torch.Tensor:
        """f(x) for x [..., 2] -> [...]."""
        a, b = x[..., 0], x[..., 1]
        return (a**2 + 5).sqrt() - math.sqrt(5) + b.sin() ** 2 * (-5 * a**2).exp() + 0.25 * (b - 100).abs()

    @staticmethod
    def gradient(x: torch.Tensor) -> torch.Tensor:
        """grad f(x) for x [..., 2] -> [..., 2], written out so that it stays differentiable."""
        a, b = x[..., 0], x[..., 1]
        ripple = (-5 * a**2).exp()  # [...]
        da = a / (a**2 + 5).sqrt() - 10 * a * b.sin() ** 2 * ripple
        db = (2 * b).sin() * ripple + 0.25 * (b - 100).sign()
        return torch.stack([da, db], dim=-1)

    def learning_rate(self, theta: torch.Tensor, t: int) -> torch.Tensor:
        """lr_t for theta [P, 2] -> [P]."""
        rates = theta.exp()  # [P, 2]
        return rates[:, 0] * (self.horizon - t) / self.horizon + rates[:, 1] * t / self.horizon

    def init(self, particles: int) -> dict:
        return {"x": torch.ones(particles, 2, dtype=torch.float64), "t": 0}

    def unroll(self, state: dict, phi: list[torch.Tensor], steps: int) -> tuple[dict, torch.Tensor]:
        (theta,) = phi  # [P, 2]
        x, t, losses = state["x"], state["t"], []
        for _ in range(steps):
            x = x - self.learning_rate(theta, t).unsqueeze(-1) * self.gradient(x)  # [P, 2]
            losses.append(self.loss(x))
            t += 1
        return {"x": x, "t": t}, torch.stack(losses).mean(0)
