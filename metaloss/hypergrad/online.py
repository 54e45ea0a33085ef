"""Online estimators (TBPTT, PES, ES-Single) on the episodic algorithms: each episode's inner loop
becomes an `EpisodeSystem` and is walked truncation by truncation with a fresh online estimator.

Meta-objective `query` (L_outer after T steps): the estimate is that of the last truncation, the
one whose loss is L_outer(w_T) (unbiased for PES and ES-Single, truncated for TBPTT).
Meta-objective `inner_mean`: the truncations' estimates weighted by their share of the T steps,
the estimate of the mean inner loss over the whole trajectory. phi is updated once per episode
batch here (update interval = the horizon); `metaloss.online.online_meta_train` updates it every
truncation on a long-running system.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import HypergradEstimator, OnlineEstimator, mean_over_tasks
from metaloss.hypergrad.es import OnlineES
from metaloss.hypergrad.truncated import TruncatedBackprop
from metaloss.online import EpisodeSystem
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class EpisodicOnline(HypergradEstimator):
    """kind: "tbptt", "pes" or "es_single"; truncation: K inner steps per truncation; particles and
    sigma: for the ES kinds; seed: fixes the ES noise of every (call, episode) of a run."""

    def __init__(
        self, kind: str = "es_single", truncation: int = 1, particles: int = 8, sigma: float = 0.01, seed: int = 0
    ) -> None:
        makers: dict[str, Callable[[int], OnlineEstimator]] = {
            "tbptt": lambda s: TruncatedBackprop(truncation),
            "pes": lambda s: OnlineES(particles, sigma, truncation, resample_every=1, seed=s),
            "es_single": lambda s: OnlineES(particles, sigma, truncation, resample_every=None, seed=s),
        }
        if kind not in makers:
            raise ConfigError(f"unknown online estimator {kind!r}; expected one of {sorted(makers)}")
        makers[kind](seed)  # validates the settings now
        self.kind, self.make, self.truncation, self.seed = kind, makers[kind], truncation, seed
        self.calls = self.tasks = 0

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        self.calls, self.tasks = self.calls + 1, 0
        return mean_over_tasks(problem, episodes, self._task)

    def _task(self, problem: BilevelProblem, episode: Episode, phi: list[Tensor], scale: float):
        system = EpisodeSystem(problem, episode)
        self.tasks += 1
        estimator = self.make(self.seed * 1_000_003 + self.calls * 10_007 + self.tasks)
        grads: list[Tensor | None] = [None] * len(phi)
        t = 0
        while t < system.horizon:
            out = estimator.estimate(system, phi)
            steps = min(self.truncation, system.horizon - t)
            t += steps
            if problem.meta_objective == "inner_mean":
                weight = scale * steps / system.horizon
                grads = [
                    g if o is None else (weight * o if g is None else g + weight * o) for g, o in zip(grads, out.grads)
                ]
            else:
                grads = [None if o is None else scale * o for o in out.grads]
        return grads, {"loss": out.outer_loss}
