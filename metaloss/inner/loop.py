"""The one inner loop. Every estimator and every evaluation calls it; none re-implements it.

    w_{t+1}, s_{t+1} = update(grad_w L_inner(w_t), s_t, w_t),    t = 0 .. T-1

Backpropagation modes (chosen by the caller, usually an estimator):

- full second order: the graph of every step is kept (`create_graph=True`), so
  d w_T / d phi includes all Hessian terms (MAML, Finn et al. 2017);
- first order (`second_order=False`): inner gradients are treated as constants,
  so d w_T / d w_0 = I (FOMAML); hyperparameters still get their first-order
  gradient through the update rule;
- truncated (`differentiable_steps=K`): w and the optimizer state are cut from
  the graph (stop-gradient) before the last K steps, so the hypergradient only
  sees those K steps (truncated backpropagation, Shaban et al. 2019).
  `differentiable_steps=0` runs the loop with no graph at all (evaluation).

`functional=True` takes the inner gradients with `torch.func.grad` instead of autograd, so the
loop composes with `torch.func.vmap` (ES particles, or the tasks of a meta-batch, run as one batch).
It keeps no autograd graph; under an outer `torch.func.grad` it is differentiated like the autograd
loop, with the same three modes (first order: the inner gradients detached; truncated: w and the
optimizer state detached before the last K steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.functional import detach_params, tree_detach
from metaloss.inner.optim import InnerOptimizer, OptState
from metaloss.types import Params


@dataclass
class InnerResult:
    """Adapted parameters w_T, the optimizer state s_T, and the inner loss L_in(w_t, t) of every step
    (detached, unless the loop ran with keep_loss_graph=True and step t was tracked)."""

    params: Params
    opt_state: OptState
    losses: list[Tensor] = field(default_factory=list)


def run_inner_loop(
    params: Params,
    loss_fn: Callable[[Params, int], Tensor],
    optimizer: InnerOptimizer,
    steps: int,
    *,
    second_order: bool = True,
    differentiable_steps: int | None = None,
    opt_state: OptState | None = None,
    on_step: Callable[[int, Params], None] | None = None,
    first_step: int = 0,
    keep_loss_graph: bool = False,
    functional: bool = False,
    reduce_grads: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> InnerResult:
    """Take `steps` steps of `optimizer` on `loss_fn`, starting from `params` (w_0, may depend on phi).

    loss_fn(w, t) is the inner loss at global step t = first_step, first_step + 1, ... (t selects
    e.g. a minibatch; a segment of a longer loop starts at first_step > 0).
    on_step(t, w_t) is called for t = 0 (before the first step) and after every step (local t).
    keep_loss_graph: keep each tracked step's loss with its graph (a trajectory meta-objective
    needs it; it costs memory O(T), so it is off by default).
    functional: gradients by `torch.func.grad_and_value`, no graph kept (see the module docstring).
    reduce_grads: applied to every step's gradients before the update, e.g. the sum over the ranks
    of a data-parallel run (`metaloss.distributed.Distributed.sum_tensors`, differentiable).
    """
    if steps < 0:
        raise ConfigError(f"inner steps must be >= 0, got {steps}")
    if functional and reduce_grads is not None:
        raise ConfigError("a data-parallel inner loop runs with autograd gradients, not functional (vmapped) ones")
    if functional:
        return _functional_loop(params, loss_fn, optimizer, steps, opt_state, on_step, first_step, second_order,
                                first_tracked_step(steps, differentiable_steps))  # fmt: skip
    first_tracked = first_tracked_step(steps, differentiable_steps)
    state = optimizer.init(params) if opt_state is None else opt_state
    losses: list[Tensor] = []
    if on_step is not None:
        on_step(0, params)
    for t in range(steps):
        tracked = t >= first_tracked
        if not tracked or (t == first_tracked and t > 0):
            # stop-gradient: nothing before the window is tracked, and the window starts from a cut
            params = detach_params(params, requires_grad=True)
            state = tree_detach(state)
        else:
            params = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()}
        loss = loss_fn(params, first_step + t)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=tracked and second_order)
        if reduce_grads is not None:
            grads = tuple(reduce_grads(list(grads)))
        new_params, state = optimizer.update(dict(zip(params, grads)), state, params)
        if not tracked:
            new_params, state = detach_params(new_params), tree_detach(state)
        params = new_params
        losses.append(loss if keep_loss_graph and tracked else loss.detach())
        if on_step is not None:
            on_step(t + 1, params)
    return InnerResult(params, state, losses)


def first_tracked_step(steps: int, differentiable_steps: int | None) -> int:
    """The first of the `steps` steps that the hypergradient sees (all: None)."""
    window = steps if differentiable_steps is None else differentiable_steps
    if window < 0:
        raise ConfigError(f"differentiable_steps must be >= 0, got {differentiable_steps}")
    return max(steps - window, 0)


def _functional_loop(
    params: Params,
    loss_fn: Callable[[Params, int], Tensor],
    optimizer: InnerOptimizer,
    steps: int,
    opt_state: OptState | None,
    on_step: Callable[[int, Params], None] | None,
    first_step: int,
    second_order: bool = True,
    first_tracked: int = 0,
) -> InnerResult:
    """The same steps with `torch.func` gradients: vmap-able, and differentiable by an outer
    `torch.func.grad` in the autograd loop's modes (stop-gradients by `detach`, which acts at the
    transform's level)."""
    from torch.func import grad_and_value

    state = optimizer.init(params) if opt_state is None else opt_state
    losses: list[Tensor] = []
    if on_step is not None:
        on_step(0, params)
    for t in range(steps):
        tracked = t >= first_tracked
        if not tracked or (t == first_tracked and t > 0):  # stop-gradient: the window starts from a cut
            params, state = tree_detach(params), tree_detach(state)
        grads, loss = grad_and_value(lambda p, step=first_step + t: loss_fn(p, step))(params)
        if not (tracked and second_order):
            grads = {n: g.detach() for n, g in grads.items()}
        params, state = optimizer.update(grads, state, params)
        if not tracked:
            params, state = tree_detach(params), tree_detach(state)
        losses.append(loss if tracked else loss.detach())
        if on_step is not None:
            on_step(t + 1, params)
    return InnerResult(params, state, losses)
