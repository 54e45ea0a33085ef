"""One training run as the online regime's inner problem, with phi updated from look-aheads (the
noisy-label methods: MW-Net, L2RW, a learned loss trained online; Shu et al. 2019, Ren et al. 2018).

The run trains the problem's model on the episode's support set (the noisy training set), in
minibatches (`BilevelProblem.inner_batch_size`, shuffled per epoch with `shuffle_seed`), through the
problem's inner optimizer (momentum, Adam state and weight decay included) with its inner loss
L_inner(.; phi). A truncation of K steps from (w_t, s_t) is a look-ahead

    w_{t+K}(phi), s_{t+K}(phi) = InnerOpt^K(L_inner(.; phi), w_t, s_t),
    loss = L_outer(f(x_m; w_{t+K}(phi)), y_m)

with (x_m, y_m) a meta batch of the episode's query set (the clean meta set), fresh for each
truncation; `TruncatedBackprop` differentiates it into phi (K = 1: MW-Net's one-step look-ahead).

meta_source="train" (self-taught rescaling, STORM-style): no clean data; the meta batch is the
`meta_batch_size` rows that the current inner loss's `weights` rank highest among `select_factor`
times as many rows drawn from the training set, scored with their (noisy) labels.

real_step="after_update" (MW-Net's order): the look-ahead is virtual; the K real steps from (w_t,
s_t) are taken, with phi as the outer optimizer left it after this truncation, at the start of the
next truncation (and by `finish` after the last). real_step="lookahead": the look-ahead's steps are
the real ones (phi one update behind; one pass fewer per step).

average > 0: the inner optimizer also keeps an exponential moving average of the real iterates
(`metaloss.inner.optim.averaged`), and `averaged_params(state)` is that averaged model (the look-ahead
still steps, and is scored, from the last iterate).

`lookahead` takes a look-ahead's K steps without a graph and records them (`Lookahead`), for the
estimators that differentiate each step on its own (the label-correction papers' identity-Hessian
approximation, MPL's feedback); `meta_loss` adds the inner loss's own `outer_terms` (a teacher's
supervised losses) to the meta batch's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.functional import detach_params, tree_detach
from metaloss.inner.optim import InnerOptimizer, averaged
from metaloss.online import State
from metaloss.problem import BilevelProblem, WithParameters
from metaloss.types import Episode, LossContext, Params

REAL_STEPS = ("after_update", "lookahead")
META_SOURCES = ("meta", "train")


@dataclass
class Lookahead:
    """A recorded look-ahead from step t: points [(w_k, s_k)] for k < K (detached), the final w_K
    (detached), the problem with phi and the meta batch that scores it."""

    t: int
    points: list[tuple[Params, Any]]
    final: Params
    problem: BilevelProblem
    meta: Episode


def check_data_parallel(problem: BilevelProblem, episode: Episode, meta_batch_size: int | None,
                        meta_source: str) -> None:
    """What a data-parallel training run (`BilevelProblem.data_parallel`) needs: an inner loss that is
    a mean of per-row terms, so that the shares of the ranks' rows add up to it (not L2RW's free
    weights of batch positions, weights normalised over the batch, or a weighter that runs the model
    itself), no BatchNorm (its batch statistics are not synchronised over the ranks), meta batches
    drawn from the clean meta set, and at least one row per rank in every batch."""
    world = problem.data_parallel.world_size if problem.data_parallel is not None else 1
    loss = problem.inner_loss
    weighter = getattr(loss, "weighter", None)
    if getattr(loss, "normalize", False) or getattr(weighter, "depends_on_sample", True) is False or getattr(
            weighter, "needs_context", False):  # fmt: skip
        raise ConfigError("a data-parallel run needs an inner loss that is a mean over rows; weights normalised "
                          "over a batch, L2RW's per-position weights and the self-taught rescaler run in one "
                          "process")  # fmt: skip
    if meta_source != "meta":
        raise ConfigError("a data-parallel run draws its meta batches from the clean meta set (meta_source=meta)")
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in problem.model.modules()):
        raise ConfigError("a data-parallel run does not synchronise BatchNorm statistics over the ranks: use a model "
                          "without BatchNorm, or one process")  # fmt: skip
    meta = len(episode.query_x) if meta_batch_size is None else min(meta_batch_size, len(episode.query_x))
    if (problem.inner_batch_size or 0) < world or meta < world:
        raise ConfigError(f"a data-parallel run over {world} ranks needs batches of at least {world} rows, got "
                          f"{problem.inner_batch_size} training and {meta} meta rows")  # fmt: skip


def meta_rows(seed: int, t: int, n: int, size: int | None, stream: int = 7) -> Tensor:
    """The meta batch of the truncation that starts at step t: `size` rows of n, drawn from (seed, t,
    stream) (None: all n rows)."""
    if size is None or size >= n:
        return torch.arange(n)
    seeds = np.random.SeedSequence([seed, t, stream]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(seeds[0]) << 32 | int(seeds[1]))
    return torch.randperm(n, generator=g)[:size]


class LookaheadTraining:
    """A `TruncatedSystem` (see the module docstring): `horizon` steps of training on
    `episode.support_*`, look-aheads scored on `meta_batch_size` rows of `episode.query_*`.
    The model that results is `finish(state, phi)`; `params(state)` is the one trained so far."""

    def __init__(self, problem: BilevelProblem, episode: Episode, horizon: int, meta_batch_size: int | None = None,
                 seed: int = 0, real_step: str = "after_update", meta_source: str = "meta",
                 select_factor: int = 4, average: float = 0.0) -> None:  # fmt: skip
        if problem.inner_batch_size is None:
            raise ConfigError("a training run needs minibatches: set the problem's inner_batch_size")
        if real_step not in REAL_STEPS:
            raise ConfigError(f"unknown real_step {real_step!r}; expected one of {REAL_STEPS}")
        if horizon < 1 or (meta_batch_size is not None and meta_batch_size < 1):
            raise ConfigError(f"need horizon >= 1 and meta_batch_size >= 1 or None, got {horizon}, {meta_batch_size}")
        if meta_source not in META_SOURCES or select_factor < 1:
            raise ConfigError(f"need meta_source in {META_SOURCES} and select_factor >= 1, got {meta_source!r} and "
                              f"{select_factor}")  # fmt: skip
        if meta_source == "train" and (meta_batch_size is None or not hasattr(problem.inner_loss, "weights")):
            raise ConfigError("meta_source=train selects its meta batch with the inner loss's weights: it needs a "
                              "weighted inner loss and a meta_batch_size")  # fmt: skip
        self.problem, self.episode, self.horizon = problem, episode, horizon
        self.meta_batch_size, self.seed, self.real_step = meta_batch_size, seed, real_step
        self.meta_source, self.select_factor = meta_source, select_factor
        self.average = average
        averaged(problem.inner_opt(), average)  # a bad decay fails here, before any work
        if problem.data_parallel is not None and problem.data_parallel.enabled:
            check_data_parallel(problem, episode, meta_batch_size, meta_source)

    def init(self, particles: int) -> State:
        """Every particle at w0 (the problem's initialisation, detached) with a fresh optimizer state."""
        w0, _ = self.problem.initial_params(self.episode)
        return {"t": 0, "pending": 0, "particles": [(detach_params(w0), None) for _ in range(particles)]}

    def _advance(self, problem: BilevelProblem, params: Params, opt_state: Any, t: int, steps: int,
                 graph: bool) -> Any:  # fmt: skip
        """`steps` training steps from step t; graph=False: no graph to phi (the real steps)."""
        w0, frozen = problem.initial_params(self.episode)
        with torch.enable_grad():
            return problem.run_inner(self.episode, params, detach_params(w0), detach_params(frozen), steps,
                                     opt_state=opt_state, first_step=t, optimizer=self.optimizer(problem),
                                     differentiable_steps=None if graph else 0)  # fmt: skip

    def optimizer(self, problem: BilevelProblem) -> InnerOptimizer:
        """`problem`'s inner optimizer (with its phi), averaging its iterates where `average` > 0."""
        inner = problem.inner_opt()
        return averaged(inner, self.average) if self.average else inner

    def _real_steps(self, state: State, phi: Sequence[Tensor]) -> State:
        """Take the pending real steps of every particle with (detached) phi."""
        if not state["pending"]:
            return state
        t0, particles = state["t"] - state["pending"], []
        for i, (params, opt_state) in enumerate(state["particles"]):
            problem = self.problem.with_meta_parameters([p[i].detach() for p in phi]) if phi else self.problem
            result = self._advance(problem, params, opt_state, t0, state["pending"], graph=False)
            particles.append((detach_params(result.params), tree_detach(result.opt_state)))
        return {"t": state["t"], "pending": 0, "particles": particles}

    def unroll(self, state: State, phi: Sequence[Tensor], steps: int) -> tuple[State, Tensor]:
        state = self._real_steps(state, phi)
        t, losses, particles = state["t"], [], []
        meta = self._meta_batch(t, state["particles"][0][0])
        share = self._meta_share(meta)
        for i, (params, opt_state) in enumerate(state["particles"]):
            problem = self.problem.with_meta_parameters([p[i] for p in phi]) if phi else self.problem
            result = self._advance(problem, detach_params(params), tree_detach(opt_state), t, steps, graph=True)
            losses.append(self.meta_loss(problem, result.params, meta) * share)
            carried = (params, opt_state) if self.real_step == "after_update" else (
                detach_params(result.params), tree_detach(result.opt_state))  # fmt: skip
            particles.append(carried)
        pending = steps if self.real_step == "after_update" else 0
        return {"t": t + steps, "pending": pending, "particles": particles}, torch.stack(losses)

    def meta_loss(self, problem: BilevelProblem, params: Params, meta: Episode) -> Tensor:
        """The look-ahead's outer loss: L_outer(f(x_m; w), y_m) on the meta batch, plus the inner loss's
        own outer terms on it where it has them (`outer_terms(x_m, y_m)`, e.g. EMLC's teacher losses),
        with `problem`'s phi."""
        _, frozen = problem.initial_params(self.episode)
        loss = problem.query_loss({**detach_params(frozen), **params}, meta)[0]
        if hasattr(problem.inner_loss, "outer_terms"):  # first_row: where a rank's share starts in the batch
            loss = loss + self.call_inner_loss(problem, "outer_terms", meta.query_x, meta.query_y,
                                               meta.meta.get("first_row", 0))  # fmt: skip
        return loss

    @staticmethod
    def call_inner_loss(problem: BilevelProblem, method: str, *args: Any) -> Any:
        """The inner loss's `method` with `problem`'s phi."""
        inner_loss = problem.inner_loss
        if isinstance(inner_loss, WithParameters):
            return inner_loss.call(method, *args)
        return getattr(inner_loss, method)(*args)

    def step_inputs(self, look: Lookahead, k: int) -> Tensor:
        """The inputs of the minibatch of the look-ahead's step k [B, ...]."""
        x = self.episode.support_x
        return x[self.problem.batch_rows(look.t + k, len(x))]

    def lookahead(self, state: State, phi: Sequence[Tensor], steps: int) -> tuple[State, Lookahead]:
        """Like `unroll` (particle 0 only), but the K steps are taken without a graph to phi and
        recorded, for an estimator that differentiates each step on its own (`IdentityHessian`)."""
        if len(state["particles"]) != 1:
            raise ConfigError("a recorded look-ahead runs one particle")
        if self.problem.data_parallel is not None and self.problem.data_parallel.enabled:
            raise ConfigError("a recorded look-ahead (identity_hessian, mpl_feedback) runs in one process")
        state = self._real_steps(state, phi)
        t, (params, opt_state) = state["t"], state["particles"][0]
        problem = self.problem.with_meta_parameters([p[0] for p in phi]) if phi else self.problem
        fixed = self.problem.with_meta_parameters([p[0].detach() for p in phi]) if phi else self.problem
        w, s, points = detach_params(params), tree_detach(opt_state), []
        for k in range(steps):
            points.append((w, s))
            result = self._advance(fixed, w, s, t + k, 1, graph=False)
            w, s = detach_params(result.params), tree_detach(result.opt_state)
        carried = (params, opt_state) if self.real_step == "after_update" else (w, s)
        new_state = {"t": t + steps, "pending": steps if self.real_step == "after_update" else 0,
                     "particles": [carried]}  # fmt: skip
        return new_state, Lookahead(t, points, w, problem, self._meta_batch(t, params))

    def step_from(self, look: Lookahead, k: int) -> Params:
        """w_{k+1}(phi): one step of the look-ahead from its recorded, detached (w_k, s_k), with a graph
        to phi."""
        w, s = look.points[k]
        return self._advance(look.problem, w, s, look.t + k, 1, graph=True).params

    def step_parts(self, look: Lookahead, k: int) -> tuple[Callable[[Params], Tensor], Any]:
        """Step k's inner loss as a function of w (with phi: L_inner(w; phi) on step t + k's minibatch)
        and the inner optimizer, for an estimator that differentiates the step piecewise."""
        w0, frozen = look.problem.initial_params(self.episode)
        objective = look.problem.inner_objective(self.episode, detach_params(w0), detach_params(frozen))
        return (lambda w: objective(w, look.t + k)), self.optimizer(look.problem)

    def _meta_batch(self, t: int, params: Params) -> Episode:
        """The episode whose query set scores the look-ahead that starts at step t: rows of the meta
        set, or (meta_source="train") the training rows the current weighting ranks highest under
        the model `params` (particle 0's)."""
        e = self.episode
        if self.meta_source == "meta":
            rows = meta_rows(self.seed, t, len(e.query_x), self.meta_batch_size)
            start = 0
            if self.problem.data_parallel is not None and self.problem.data_parallel.enabled:
                start, stop = self.problem.data_parallel.shard(len(rows))
                rows = rows[start:stop]  # this rank's m_r of the m rows
            return Episode(e.support_x, e.support_y, e.query_x[rows], e.query_y[rows], {"first_row": start})
        assert self.meta_batch_size is not None
        candidates = meta_rows(self.seed, t, len(e.support_x), self.meta_batch_size * self.select_factor, stream=8)
        x, y = e.support_x[candidates], e.support_y[candidates]
        _, frozen = self.problem.initial_params(e)
        full = {**detach_params(frozen), **detach_params(params)}
        with torch.no_grad():
            logits = self.problem.predict(full, x)
            context = LossContext(x, full, None, e, lambda inputs: self.problem.predict(full, inputs))
            weights = self.problem.inner_loss.weights(logits, y, context)  # [k * m]
        keep = candidates[weights.topk(self.meta_batch_size).indices]
        return Episode(e.support_x, e.support_y, e.support_x[keep], e.support_y[keep])

    def _meta_share(self, meta: Episode) -> float:
        """The factor of this rank's meta loss in a data-parallel run, W m_r / m (the mean over the ranks
        of the shares' phi-gradients is then the meta-gradient of the whole meta batch); 1 in one
        process."""
        parallel = self.problem.data_parallel
        if parallel is None or not parallel.enabled:
            return 1.0
        total = self.meta_batch_size if self.meta_batch_size is not None else len(self.episode.query_x)
        return parallel.world_size * len(meta.query_x) / min(total, len(self.episode.query_x))

    def finish(self, state: State, phi: Sequence[Tensor]) -> Params:
        """The trained model's parameters (particle 0) after the pending real steps, taken with phi."""
        return self.params(self.finish_state(state, phi))

    def finish_state(self, state: State, phi: Sequence[Tensor]) -> State:
        """The state after the pending real steps, taken with phi (unbatched)."""
        return self._real_steps(state, [p.unsqueeze(0).expand(len(state["particles"]), *p.shape) for p in phi])

    def params(self, state: State) -> Params:
        """All parameters of particle 0's model as trained so far (pending real steps not taken)."""
        _, frozen = self.problem.initial_params(self.episode)
        return {**detach_params(frozen), **state["particles"][0][0]}

    def averaged_params(self, state: State) -> Params | None:
        """The moving average of particle 0's iterates so far (None: no averaging, or no step yet)."""
        opt_state = state["particles"][0][1]
        if not self.average or opt_state is None:
            return None
        _, frozen = self.problem.initial_params(self.episode)
        return {**detach_params(frozen), **opt_state["average"]}
