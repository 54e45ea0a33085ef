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

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaloss.errors import ConfigError
from metaloss.functional import detach_params
from metaloss.inner.loop import run_inner_loop
from metaloss.inner.optim import tree_detach

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


def broadcast(phi: Sequence[Tensor], particles: int) -> list[Tensor]:
    """phi as [P, *shape] tensors, the same for every particle (keeps the graph to phi)."""
    return [p.unsqueeze(0).expand(particles, *p.shape) for p in phi]


def detach_state(state: State) -> State:
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in state.items()}


def online_meta_train(
    system: TruncatedSystem,
    estimator: Any,
    phi: Sequence[torch.nn.Parameter],
    outer_opt: torch.optim.Optimizer,
    truncations: int,
    *,
    progress: bool = False,
) -> list[dict[str, float]]:
    """`truncations` outer steps: each one asks `estimator` (an OnlineEstimator) for the
    hypergradient of the next truncation and applies it. Returns the metrics of every step."""
    if truncations < 0:
        raise ConfigError(f"truncations must be >= 0, got {truncations}")
    history = []
    for _ in tqdm(range(truncations), desc="online meta-train", disable=not progress, dynamic_ncols=True):
        out = estimator.estimate(system, list(phi))
        for p, g in zip(phi, out.grads):
            p.grad = None if g is None else g.detach()
        outer_opt.step()
        history.append({**out.metrics, **{f"phi/{i}": p.detach().float().mean().item() for i, p in enumerate(phi)}})
    return history


class EpisodeSystem:
    """One episode of a `BilevelProblem` as a `TruncatedSystem`, so that the online estimators
    (TBPTT, PES, ES-Single) apply to any algorithm: the horizon is the problem's T inner steps, the
    state is each particle's adapted parameters and optimizer state, and the loss of a truncation
    is the problem's meta-objective over it (`inner_mean`: the mean inner loss of its K steps;
    `query`: the query loss after it). phi enters through `torch.func.functional_call` on the
    meta-modules, one particle at a time, so a particle's phi is any tensor (perturbed or not).
    """

    def __init__(self, problem: Any, episode: Any) -> None:
        self.problem, self.episode, self.horizon = problem, episode, problem.inner_steps
        self.names = [(key, name) for key, m in problem.meta_modules().items() for name, p in m.named_parameters()
                      if p.requires_grad]  # fmt: skip
        if len(self.names) != len(problem.meta_parameters()):
            raise ConfigError("EpisodeSystem needs meta-parameters that are not shared between meta-modules")

    def _problem_with(self, phi: Sequence[Tensor]) -> Any:
        """The problem with every meta-module's parameters replaced by this particle's phi."""
        from torch.func import functional_call

        by_module: dict[str, dict[str, Tensor]] = {}
        for (key, name), value in zip(self.names, phi):
            by_module.setdefault(key, {})[name] = value
        modules = self.problem.meta_modules()
        replaced = {key: (lambda *args, m=modules[key], p=params: functional_call(m, p, args))
                    for key, params in by_module.items()}  # fmt: skip
        return dataclasses.replace(self.problem, **replaced)

    def init(self, particles: int) -> State:
        return {"particles": [None] * particles, "t": 0}

    def unroll(self, state: State, phi: Sequence[Tensor], steps: int) -> tuple[State, Tensor]:
        episode, losses, particles = self.episode, [], []
        for i, carried in enumerate(state["particles"]):
            problem = self._problem_with([p[i] for p in phi])
            w0, frozen = problem.initial_params()
            if carried is None:  # the inner problem starts: w0 keeps its graph to phi
                params, opt_state = w0, None
            else:  # the state carried from the last truncation is cut from the graph
                params, opt_state = detach_params(carried[0]), tree_detach(carried[1])
            with torch.enable_grad():  # the inner loop differentiates w even when the caller does not
                result = run_inner_loop(
                    params,
                    problem.inner_objective(episode, w0, frozen),
                    problem.inner_opt(),
                    steps,
                    opt_state=opt_state,
                    first_step=state["t"],
                    keep_loss_graph=True,
                )
            if problem.meta_objective == "inner_mean":
                losses.append(torch.stack(result.losses).mean())
            else:
                losses.append(problem.query_loss({**frozen, **result.params}, episode)[0])
            particles.append((result.params, result.opt_state))
        return {"particles": particles, "t": state["t"] + steps}, torch.stack(losses)
