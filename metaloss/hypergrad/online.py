"""Online estimators (TBPTT, PES, ES-Single) on the episodic algorithms: each episode's inner loop
becomes an `EpisodeSystem` and is walked truncation by truncation with a fresh online estimator.

update="horizon" (phi updated once per meta-batch, after every truncation of its inner problems):
- meta-objective `query` (L_outer after T steps): the estimate is that of the last truncation,
  the one whose loss is L_outer(w_T) (unbiased for PES and ES-Single, truncated for TBPTT);
- meta-objective `inner_mean`: the truncations' estimates weighted by their share of the T steps,
  the estimate of the mean inner loss over the whole trajectory.

update="truncation" (the online regime of Vicol et al. 2021; Li et al. 2023): phi is updated after
every truncation from the mean estimate over the meta-batch's inner problems, which run in
lockstep and go on with the updated phi. Each update descends that truncation's loss (its mean
inner loss, or the query loss after it), so a long inner problem, e.g. a whole training run, gets
T / K meta-updates instead of one. update=m (an int): the same, with the mean of every m
truncations' estimates per update (the update interval; "truncation" is m = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import HypergradEstimator, OnlineEstimator, mean_over_tasks
from metaloss.hypergrad.es import OnlineES
from metaloss.hypergrad.identity_hessian import IdentityHessian
from metaloss.hypergrad.pseudo_label_feedback import PseudoLabelFeedback
from metaloss.hypergrad.truncated import TruncatedBackprop
from metaloss.online import EpisodeSystem, Truncation
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut

UPDATES = ("horizon", "truncation")


def _eta(eta: float | None) -> float:
    if eta is None:
        raise ConfigError("the identity_hessian kinds discount by (1 - eta)^(K-1-k): set hypergrad.eta (the inner "
                          "learning rate)")  # fmt: skip
    return float(eta)


def _add(total: list[Tensor | None], part: Sequence[Tensor | None], weight: float) -> list[Tensor | None]:
    """total + weight * part, where None is an absent (zero) gradient."""
    return [t if p is None else (weight * p if t is None else t + weight * p) for t, p in zip(total, part)]


class EpisodicOnline(HypergradEstimator):
    """kind: "tbptt", "pes" or "es_single" (or, on a training run's look-aheads, "identity_hessian" and
    "identity_hessian_jvp", `metaloss.hypergrad.identity_hessian`, with eta, and "mpl_feedback",
    `metaloss.hypergrad.pseudo_label_feedback`); truncation: K inner steps per truncation, or a schedule
    of lengths (`metaloss.online.check_truncation`, e.g. [1, 2, 4]); particles and
    sigma: for the ES kinds; update: "horizon", "truncation" or an int m (see the module docstring);
    seed: fixes the ES noise of every (call, episode) of a run; batched: run an ES kind's particles
    as one `vmap` batch (see `EpisodeSystem`)."""

    def __init__(
        self,
        kind: str = "es_single",
        truncation: Truncation = 1,
        particles: int = 8,
        sigma: float = 0.01,
        seed: int = 0,
        update: str | int = "horizon",
        batched: bool = False,
        eta: float | None = None,
    ) -> None:
        makers: dict[str, Callable[[int], OnlineEstimator]] = {
            "tbptt": lambda s: TruncatedBackprop(truncation),
            "identity_hessian": lambda s: IdentityHessian(truncation, _eta(eta), "reverse"),
            "identity_hessian_jvp": lambda s: IdentityHessian(truncation, _eta(eta), "forward"),
            "mpl_feedback": lambda s: PseudoLabelFeedback(truncation),  # type: ignore[arg-type]
            "pes": lambda s: OnlineES(particles, sigma, truncation, resample_every=1, seed=s),
            "es_single": lambda s: OnlineES(particles, sigma, truncation, resample_every=None, seed=s),
        }
        if kind not in makers:
            raise ConfigError(f"unknown online estimator {kind!r}; expected one of {sorted(makers)}")
        if update not in UPDATES and (isinstance(update, bool) or not isinstance(update, int) or update < 1):
            raise ConfigError(f"unknown update interval {update!r}; expected one of {UPDATES} or an int >= 1")
        if batched and kind not in ("pes", "es_single"):
            raise ConfigError(f"batched particles are for the ES kinds (pes, es_single); {kind} runs one particle")
        makers[kind](seed)  # validates the settings now
        self.kind, self.make, self.seed, self.update = kind, makers[kind], seed, update
        self.batched = batched
        self.calls = self.tasks = 0

    def state_dict(self) -> dict[str, int]:
        """The call counter that seeds each meta-step's noise. The online estimators of a meta-step live
        only inside it, so between meta-steps (where checkpoints are taken) this is all the state."""
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])

    def online_estimator(self) -> OnlineEstimator:
        """A fresh online estimator of this kind and these settings, seeded with `seed`, to walk one
        long inner problem (e.g. a training run, `metaloss.lookahead.LookaheadTraining`)."""
        return self.make(self.seed)

    def _new_estimator(self) -> OnlineEstimator:
        self.tasks += 1
        return self.make(self.seed * 1_000_003 + self.calls * 10_007 + self.tasks)

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        if self.update != "horizon":
            raise ConfigError(f"update={self.update!r} means several updates per meta-step: use updates()")
        self.calls, self.tasks = self.calls + 1, self.task_offset
        return mean_over_tasks(problem, episodes, self._task)

    def updates(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> Iterator[HypergradOut]:
        if self.update == "horizon":
            yield self.estimate(problem, episodes)
            return
        if not episodes:
            raise ConfigError("a meta-batch needs at least one episode")
        self.calls, self.tasks = self.calls + 1, self.task_offset
        runs = [(EpisodeSystem(problem, episode, self.batched), self._new_estimator()) for episode in episodes]
        every = 1 if self.update == "truncation" else int(self.update)
        horizon, t = runs[0][0].horizon, 0
        while t < horizon:
            phi = problem.meta_parameters()  # as the caller left it after the last update
            grads: list[Tensor | None] = [None] * len(phi)
            losses, truncations = [], 0
            while t < horizon and truncations < every:
                for system, estimator in runs:
                    out = estimator.estimate(system, phi)
                    grads = _add(grads, out.grads, 1.0 / len(runs))
                    losses.append(out.outer_loss)
                t = int(out.metrics["t"])  # every system runs the same schedule, so they stay in lockstep
                truncations += 1
            grads = [None if g is None else g / truncations for g in grads]  # the mean over the truncations
            loss = sum(losses) / len(losses)
            yield HypergradOut(grads=grads, outer_loss=loss, metrics={"loss": loss, "t": float(t)})

    def _task(self, problem: BilevelProblem, episode: Episode, phi: list[Tensor], scale: float):
        system, estimator = EpisodeSystem(problem, episode, self.batched), self._new_estimator()
        grads: list[Tensor | None] = [None] * len(phi)
        t = 0
        while t < system.horizon:
            out = estimator.estimate(system, phi)
            steps, t = int(out.metrics["t"]) - t, int(out.metrics["t"])
            if problem.trajectory_objective:
                grads = _add(grads, out.grads, scale * steps / system.horizon)
            else:
                grads = _add([None] * len(phi), out.grads, scale)
        return grads, {"loss": out.outer_loss}
