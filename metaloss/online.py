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
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaloss.errors import ConfigError

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
