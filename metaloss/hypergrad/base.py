"""The estimator contract: a meta-batch of episodes in, d L_outer / d phi out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class HypergradEstimator(ABC):
    """Estimates the gradient of the mean outer loss over `episodes` with respect to
    `problem.meta_parameters()`. It runs the inner loop through `problem.adapt_to`
    and never re-implements it; it does not step the outer optimizer. `task_offset`: the meta-batch
    position of the first episode it is given (a rank's share of a meta-batch split over ranks,
    `metaloss.distributed`), for estimators that draw noise per task."""

    task_offset: int = 0
    particle_range: tuple[int, int] | None = None  # ES over ranks: the antithetic pairs this rank runs

    @abstractmethod
    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        """Return grads aligned with `problem.meta_parameters()`, the mean outer loss and metrics."""

    def updates(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> Iterator[HypergradOut]:
        """The outer updates of one meta-step, lazily: the caller applies each estimate to phi before
        it asks for the next, so an estimator in the online regime sees the updated phi in its next
        truncation. By default a meta-step is one update, `estimate`."""
        yield self.estimate(problem, episodes)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs for its next estimates to equal the uninterrupted run's (e.g. the
        call counter that seeds ES noise): tensors and plain values only. Empty for a stateless one."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`."""
        if state:
            raise ConfigError(f"{type(self).__name__} is stateless but was given estimator state {sorted(state)}")


TaskEstimate = Callable[[BilevelProblem, Episode, list[Tensor], float], tuple[Sequence[Tensor | None], dict[str, Any]]]


def mean_over_tasks(problem: BilevelProblem, episodes: Sequence[Episode], task: TaskEstimate) -> HypergradOut:
    """Sum `task(problem, episode, phi, 1 / B)` (its scaled gradient and metrics) over a meta-batch
    of B episodes, task by task, so one task's graph is freed before the next is built. A gradient
    stays None where no task reached that meta-parameter (an optimizer then leaves it alone)."""
    if not episodes:
        raise ConfigError("a meta-batch needs at least one episode")
    phi = problem.meta_parameters()
    grads: list[Tensor | None] = [None] * len(phi)
    sums: dict[str, float] = {}
    for episode in episodes:
        task_grads, metrics = task(problem, episode, phi, 1.0 / len(episodes))
        grads = [t if g is None else (g if t is None else g + t) for g, t in zip(grads, task_grads)]
        for k, value in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(value)
    means = {k: v / len(episodes) for k, v in sums.items()}
    return HypergradOut(grads=grads, outer_loss=means["loss"], metrics=means)


class OnlineEstimator(ABC):
    """The online-regime contract: each call advances the estimator's persistent inner states
    (particles) by one truncation of a `metaloss.online.TruncatedSystem` and returns the
    hypergradient estimate for that truncation, aligned with `phi`. States reset with the
    inner problem (after `system.horizon` steps)."""

    @abstractmethod
    def estimate(self, system: Any, phi: list[Tensor]) -> HypergradOut:
        """Return grads aligned with `phi`, the truncation's mean loss and metrics."""

    @abstractmethod
    def state_dict(self) -> dict:
        """The persistent state (inner states, particles, counters, noise), for checkpoints."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: the next estimates equal those of the uninterrupted run."""
