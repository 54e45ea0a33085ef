"""The online (truncated) regime: one long inner problem, split into truncations of K steps, with
phi updated after each truncation. The inner state persists across truncations and is reset when
the inner problem ends (after `horizon` steps).

An inner problem is a `TruncatedSystem`, batched over a leading particle dimension P so that ES
particles (and antithetic pairs) run as one batch:

    state = system.init(P)                          # tensors [P, ...] and the step counter "t"
    state, loss = system.unroll(state, phi, K)      # phi: one tensor [P, *shape] per meta-parameter
                                                    # loss: [P], the mean inner-step loss of the K steps
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.functional import detach_params, tree_detach, tree_flatten, tree_unflatten

State = dict[str, Any]


@runtime_checkable
class TruncatedSystem(Protocol):
    horizon: int  # steps in one inner problem

    def init(self, particles: int) -> State:
        """A fresh inner problem for `particles` particles; state["t"] = 0."""
        ...

    def unroll(self, state: State, phi: Sequence[Tensor], steps: int) -> tuple[State, Tensor]:
        """Advance every particle `steps` steps (not past the horizon); returns the new state and
        the mean loss of those steps per particle, [P]. Differentiable in phi where the system is."""
        ...


Truncation = Union[int, Sequence[int]]


def check_truncation(truncation: Truncation) -> tuple[int, ...]:
    """A truncation schedule as a tuple of lengths: K (every truncation K steps), or the lengths of
    an inner problem's first, second, ... truncations, the last one repeating (e.g. [1, 2, 4, 8]:
    short truncations while the inner state changes fast, longer ones later)."""
    lengths = (truncation,) if isinstance(truncation, int) else tuple(truncation)
    if not lengths or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in lengths):
        raise ConfigError(f"truncation must be an int >= 1 or a non-empty list of them, got {truncation!r}")
    return lengths


def truncation_length(lengths: tuple[int, ...], count: int, remaining: int) -> int:
    """Steps of an inner problem's truncation number `count` (0-based), at most `remaining`."""
    return min(lengths[min(count, len(lengths) - 1)], remaining)


def broadcast(phi: Sequence[Tensor], particles: int) -> list[Tensor]:
    """phi as [P, *shape] tensors, the same for every particle (keeps the graph to phi)."""
    return [p.unsqueeze(0).expand(particles, *p.shape) for p in phi]


def detach_state(state: State) -> State:
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in state.items()}


class OnlinePhi:
    """phi of a `TruncatedSystem` run, in the shape the outer loop (`metaloss.engine.MetaTrainer`)
    reads from a problem: `meta_parameters()`, `state_dict()` (one module, "phi") and no learned
    inner optimizer."""

    inner_opt = None

    def __init__(self, phi: Sequence[torch.nn.Parameter]) -> None:
        self.phi = list(phi)

    def meta_parameters(self) -> list[torch.nn.Parameter]:
        return self.phi

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {"phi": {str(i): p.detach().clone() for i, p in enumerate(self.phi)}}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.phi):
                p.copy_(state["phi"][str(i)])


class SystemUpdates:
    """An `OnlineEstimator` walking one `TruncatedSystem`, as the outer loop's estimator: each
    meta-step is one update of phi with the mean of the next `update_every` truncations' estimates
    (fewer for the last of `truncations`). Its state (the online estimator's: particles, noise,
    inner state) is part of the run state, so an online run checkpoints and resumes like any other.
    `history` holds every truncation's metrics."""

    def __init__(self, system: TruncatedSystem, estimator: Any, update_every: int = 1,
                 truncations: int | None = None) -> None:  # fmt: skip
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"need update_every >= 1, got {update_every!r}")
        self.system, self.estimator, self.update_every, self.truncations = system, estimator, update_every, truncations
        self.done = 0  # truncations estimated so far
        self.history: list[dict[str, float]] = []

    def updates(self, problem: Any, episodes: Sequence[Any]) -> Any:
        yield self.estimate(problem, episodes)

    def estimate(self, problem: Any, episodes: Sequence[Any]) -> Any:
        from metaloss.types import HypergradOut

        phi = list(problem.meta_parameters())
        left = self.update_every if self.truncations is None else min(self.update_every, self.truncations - self.done)
        pending, losses = [], []
        for _ in range(max(left, 1)):
            out = self.estimator.estimate(self.system, phi)
            pending.append(out.grads)
            losses.append(out.outer_loss)
            self.history.append(dict(out.metrics))
            self.done += 1
        grads = []
        for j in range(len(phi)):
            parts = [g[j].detach() for g in pending if g[j] is not None]
            grads.append(sum(parts) / len(pending) if parts else None)
        loss = sum(losses) / len(losses)
        return HypergradOut(grads=grads, outer_loss=loss, metrics={**out.metrics, "loss": loss})

    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator.state_dict(), "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"])
        self.done = int(state["done"])


def online_meta_train(
    system: TruncatedSystem,
    estimator: Any,
    phi: Sequence[torch.nn.Parameter],
    outer_opt: torch.optim.Optimizer,
    truncations: int,
    *,
    update_every: int = 1,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Run `truncations` truncations through the one outer loop (`MetaTrainer`): each asks
    `estimator` (an OnlineEstimator) for the hypergradient of the next truncation; phi is stepped
    with the mean of the estimates every `update_every` truncations (the update interval of Li et
    al. 2023; 1: every truncation) and after the last. Returns the metrics of every truncation,
    with phi's mean after it (`phi/i`)."""
    from metaloss.engine import MetaTrainer

    if truncations < 0 or isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ConfigError(f"need truncations >= 0 and update_every >= 1, got {truncations} and {update_every!r}")
    updates = SystemUpdates(system, estimator, update_every, truncations)
    trainer = MetaTrainer(OnlinePhi(phi), updates, outer_opt)  # type: ignore[arg-type]

    def means() -> dict[str, float]:
        return {f"phi/{i}": p.detach().float().mean().item() for i, p in enumerate(phi)}

    after = [means()]  # phi at the start, then after each update
    trainer.train(-(-truncations // update_every), progress=progress, after_step=lambda t: after.append(means()))
    history = []
    for n, metrics in enumerate(updates.history):  # a truncation that ends an update group sees its update
        group, last = n // update_every, n == len(updates.history) - 1 or (n + 1) % update_every == 0
        history.append({**metrics, **after[group + 1 if last else group]})
    return history


class EpisodeSystem:
    """One episode of a `BilevelProblem` as a `TruncatedSystem`, so that the online estimators
    (TBPTT, PES, ES-Single) apply to any algorithm: the horizon is the problem's T inner steps, the
    state is each particle's adapted parameters and optimizer state, and the loss of a truncation
    is the problem's meta-objective over it (`inner_mean`: the mean inner loss of its K steps;
    `query`: the query loss after it). A particle's phi (any tensor, perturbed or not) enters
    through `BilevelProblem.with_meta_parameters`.

    batched=False runs the particles one after another with autograd inner gradients (and keeps
    the graph to phi, for TBPTT); batched=True runs them as one batch with `torch.func.vmap`
    and `torch.func` inner gradients, with no graph (for the ES family, which never
    differentiates). Both give the same numbers.
    """

    def __init__(self, problem: Any, episode: Any, batched: bool = False) -> None:
        self.problem, self.episode, self.horizon, self.batched = problem, episode, problem.inner_steps, batched
        problem.with_meta_parameters(problem.meta_parameters())  # fails now if phi cannot be swapped

    def init(self, particles: int) -> State:
        return {"particles": [None] * particles, "t": 0}

    def _loss(self, problem: Any, result: Any, frozen: Any) -> Tensor:
        if problem.trajectory_objective:
            return torch.stack(result.losses).mean()
        return problem.query_loss({**frozen, **result.params}, self.episode)[0]

    def _advance(self, problem: Any, params: Any, opt_state: Any, w0: Any, frozen: Any, first_step: int, steps: int,
                 *, functional: bool) -> Any:  # fmt: skip
        """`steps` inner steps from (params, opt_state): autograd with each step's loss graph kept
        (the truncation's loss may be differentiated), or `torch.func` gradients (vmap-able)."""
        return problem.run_inner(
            self.episode,
            params,
            w0,
            frozen,
            steps,
            opt_state=opt_state,
            first_step=first_step,
            keep_loss_graph=not functional,
            functional=functional,
        )

    def unroll(self, state: State, phi: Sequence[Tensor], steps: int) -> tuple[State, Tensor]:
        if self.batched:
            return self._unroll_batched(state, phi, steps)
        losses, particles = [], []
        for i, carried in enumerate(state["particles"]):
            problem = self.problem.with_meta_parameters([p[i] for p in phi])
            w0, frozen = problem.initial_params(self.episode)
            if carried is None:  # the inner problem starts: w0 keeps its graph to phi
                params, opt_state = w0, None
            else:  # the state carried from the last truncation is cut from the graph
                params, opt_state = detach_params(carried[0]), tree_detach(carried[1])
            with torch.enable_grad():  # the inner loop differentiates w even when the caller does not
                result = self._advance(problem, params, opt_state, w0, frozen, state["t"], steps, functional=False)
            losses.append(self._loss(problem, result, frozen))
            particles.append((result.params, result.opt_state))
        return {"particles": particles, "t": state["t"] + steps}, torch.stack(losses)

    def _unroll_batched(self, state: State, phi: Sequence[Tensor], steps: int) -> tuple[State, Tensor]:
        """All particles in one `vmap`. The carried state is ([P, ...] parameters, the optimizer
        state's tensors [P, ...], a template of the optimizer state: (its leaves with None where a
        tensor goes, which leaves are tensors, its structure)); its non-tensor leaves (e.g. Adam's
        step count) are the same for every particle and stay in the template. Tensors, lists and
        plain values only, so a checkpoint of it loads with weights_only=True."""
        from torch.func import vmap

        carried = state["particles"] if isinstance(state["particles"], tuple) else None
        template = None if carried is None else carried[2]  # (leaves, is_tensor, structure)
        kept: dict[str, Any] = {}

        def one(phi_i: list[Tensor], carried_i: Any) -> tuple[Any, list[Tensor], Tensor]:
            problem = self.problem.with_meta_parameters(phi_i)
            w0, frozen = problem.initial_params(self.episode)
            if carried_i is None:
                params, opt_state = w0, None
            else:
                tensors, (slots, is_tensor, spec) = iter(carried_i[1]), template
                leaves = [next(tensors) if tensor else v for v, tensor in zip(slots, is_tensor)]
                params, opt_state = carried_i[0], tree_unflatten(leaves, spec)
            result = self._advance(problem, params, opt_state, w0, frozen, state["t"], steps, functional=True)
            leaves, spec = tree_flatten(result.opt_state)
            is_tensor = [isinstance(v, Tensor) for v in leaves]
            kept["template"] = ([None if t else v for v, t in zip(leaves, is_tensor)], is_tensor, spec)
            return result.params, [v for v in leaves if isinstance(v, Tensor)], self._loss(problem, result, frozen)

        inputs = None if carried is None else (carried[0], list(carried[1]))
        batched = vmap(one, in_dims=(0, None if carried is None else 0), randomness="same")  # same: one w0 draw
        params, tensors, loss = batched(list(phi), inputs)
        return {"particles": (params, tensors, kept["template"]), "t": state["t"] + steps}, loss
