"""The K-step look-ahead meta-gradient with the inner Hessian taken as the identity, as the label-
correction papers approximate it (MLC, Zheng et al. 2021, Sec. 3.3; EMLC, Taraday & Baskin 2023).

With w_{k+1} = U(w_k, s_k, grad L_inner(w_k; phi)) the inner optimizer's step, the exact meta-gradient
of L_meta(w_K) chains through every dw_{k+1}/dw_k = I - eta H_k. Taking H_k = I:

    dL_meta/dphi ~= sum_{k<K} (1 - eta)^(K-1-k) (d w_{k+1} / d phi |_{w_k, s_k fixed})^T g,
    g = grad_w L_meta(w_K),

where each term is the exact one-step meta-gradient from the recorded (w_k, s_k). K = 1: exact (through
the real optimizer's step: momentum, Adam, weight decay).

mode="reverse" (MLC): each term by reverse mode through one differentiable step (a double backward
through the model). mode="forward" (EMLC): the cotangent through the optimizer's step,
v_k = (dU/d grad)^T g (a backward pass through the elementwise update only), then

    (d w_{k+1}/d phi)^T g = d/dphi <v_k, grad_w L_inner(w_k; phi)> = d/dphi jvp_w(L_inner(.; phi), w_k, v_k),

a forward-mode Jacobian-vector product (`torch.func.jvp`) of the inner loss, differentiated into phi
through the loss only. Forward mode assumes the inner optimizer itself does not depend on phi.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.truncated import TruncatedBackprop
from metaloss.online import Truncation, broadcast, detach_state
from metaloss.types import HypergradOut, Params

MODES = ("reverse", "forward")


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a)  # type: ignore[return-value]


class IdentityHessian(TruncatedBackprop):
    """See the module docstring. eta: the discount's step size (the inner learning rate); truncation:
    K (or a schedule); mode: "reverse" or "forward". Needs a system that records its look-aheads
    (`metaloss.lookahead.LookaheadTraining`)."""

    def __init__(self, truncation: Truncation, eta: float, mode: str = "reverse") -> None:
        super().__init__(truncation)
        if mode not in MODES:
            raise ConfigError(f"unknown identity-Hessian mode {mode!r}; expected one of {MODES}")
        if not 0 <= eta < 2:
            raise ConfigError(f"the identity-Hessian discount needs 0 <= eta < 2, got {eta}")
        self.eta, self.mode = float(eta), mode

    def estimate(self, system, phi: list[Tensor]) -> HypergradOut:
        if not hasattr(system, "lookahead"):
            raise ConfigError("the identity-Hessian estimator differentiates recorded look-aheads: it runs on a "
                              "training run (a noisy-label task), not on episodes")  # fmt: skip
        steps = self.next_truncation(system)
        state, look = system.lookahead(detach_state(self.state), broadcast(phi, 1), steps)
        final = {n: w.detach().requires_grad_() for n, w in look.final.items()}
        with torch.enable_grad():
            meta_loss = system.meta_loss(look.problem, final, look.meta)
            g = dict(zip(final, torch.autograd.grad(meta_loss, list(final.values()), retain_graph=bool(phi))))
            surrogate = meta_loss  # its direct dependence on phi (outer terms) counts in full
            for k in range(steps):
                surrogate = surrogate + (1 - self.eta) ** (steps - 1 - k) * self._one_step(system, look, k, g)
        grads = torch.autograd.grad(surrogate, phi, allow_unused=True) if phi else ()
        self.state = detach_state(state)
        value = meta_loss.item()
        return HypergradOut(grads=list(grads), outer_loss=value, metrics={"loss": value, "t": float(state["t"])})

    def _one_step(self, system, look, k: int, g: Params) -> Tensor:
        """A scalar whose gradient in phi is (d w_{k+1} / d phi)^T g, from the recorded (w_k, s_k)."""
        if self.mode == "reverse":
            return _dot(g, system.step_from(look, k))
        loss_of, optimizer = system.step_parts(look, k)
        w, s = look.points[k]
        w = {n: p.detach() for n, p in w.items()}
        with torch.enable_grad():
            w_in = {n: p.clone().requires_grad_() for n, p in w.items()}
            grad_w = torch.autograd.grad(loss_of(w_in), list(w_in.values()))
            grads = {n: q.detach().requires_grad_() for n, q in zip(w, grad_w)}
            stepped, _ = optimizer.update(grads, optimizer.init(w) if s is None else s, w)
            cotangent = torch.autograd.grad(_dot(g, stepped), list(grads.values()), allow_unused=True)
        v = {n: torch.zeros_like(w[n]) if c is None else c.detach() for n, c in zip(w, cotangent)}
        _, directional = torch.func.jvp(loss_of, (w,), (v,))  # <grad_w L_inner(w_k; phi), v_k>, a graph to phi
        return directional
