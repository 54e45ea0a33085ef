"""Reptile's displacement as the meta-gradient of a learned initialisation (Nichol et al. 2018), which
is also Fish's inter-domain gradient matching (Shi et al. 2022) when the inner loop takes one step per
domain in turn:

    g = (1/B) sum_b (w0 - w_T,b),      phi <- phi - eps g = phi + eps (mean_b w_T,b - phi)

with the outer optimizer SGD at lr eps (Fish's theta <- theta + eps (theta~ - theta)). No derivative is
taken: the inner loop runs first order. Meta-parameters other than the initialisation get none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import HypergradEstimator, mean_over_tasks
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class Reptile(HypergradEstimator):
    """See the module docstring."""

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        return mean_over_tasks(problem, episodes, self._task)

    def _task(self, problem: BilevelProblem, episode: Episode, phi: list[Tensor], scale: float):
        w0, _ = problem.initial_params(episode)
        name_of = {id(p): name for name, p in w0.items()}
        if not any(id(p) in name_of for p in phi):
            raise ConfigError("Reptile and Fish move a learned initialisation toward the adapted parameters: "
                              "use init=learned")  # fmt: skip
        params, inner = problem.adapt_to(episode, second_order=False)
        grads = [scale * (p.detach() - params[name_of[id(p)]].detach()) if id(p) in name_of else None for p in phi]
        with torch.no_grad():
            _, metrics = problem.outer_objective(params, inner, episode)
        metrics["inner_loss_first"] = inner.losses[0].detach()
        metrics["inner_loss_last"] = inner.losses[-1].detach()
        return grads, metrics
