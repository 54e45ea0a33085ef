"""Meta Pseudo Labels' teacher feedback (Pham et al. 2021, Sec. 3 and Appendix A): the student takes one
step on hard pseudo-labels yhat ~ T(x_u; theta), and the teacher's gradient is

    g_theta = h * grad_theta sum_i CE(T(x_u,i; theta), yhat_i) + grad_theta (teacher's own outer terms),
    h = L_l(w) - L_l(w'),   w' = the student after its step on yhat,

the change of the student's loss on a labelled batch, before minus after. With yhat drawn from the
teacher this is the score-function estimate of grad_theta E_yhat[L_l(w'(yhat))] with L_l(w) as its
baseline, unbiased for any step size (E[grad log P(yhat)] = 0); to first order in the step size it is
the exact one-step meta-gradient of soft pseudo-labels (the engine's `tbptt` with mode=soft). MPL's
first-order form replaces h by its Taylor expansion eta grad L_l(w')^T grad_w CE(S(x_u), yhat); the
official code uses the difference, after minus before, with the opposite sign. One-step look-aheads
only (K = 1); needs `PseudoLabelLoss(mode="hard")`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.truncated import TruncatedBackprop
from metaloss.online import broadcast, detach_state
from metaloss.types import HypergradOut


class PseudoLabelFeedback(TruncatedBackprop):
    """See the module docstring; `truncation` must be 1."""

    def __init__(self, truncation: int = 1) -> None:
        super().__init__(truncation)
        if self.lengths != (1,):
            raise ConfigError(f"MPL's teacher feedback is for one-step look-aheads: truncation must be 1, got "
                              f"{truncation!r}")  # fmt: skip

    def estimate(self, system, phi: list[Tensor]) -> HypergradOut:
        inner_loss = getattr(system, "problem", None) and system.problem.inner_loss
        if not hasattr(system, "lookahead") or getattr(inner_loss, "mode", None) != "hard":
            raise ConfigError("MPL's teacher feedback needs a training run whose inner loss is hard pseudo-labels "
                              "(inner_loss=mpl with mode=hard); soft labels take hypergrad.kind=tbptt")  # fmt: skip
        steps = self.next_truncation(system)
        state, look = system.lookahead(detach_state(self.state), broadcast(phi, 1), steps)
        with torch.enable_grad():
            before = system.meta_loss(look.problem, look.points[0][0], look.meta)  # with the outer terms (phi)
            after = system.meta_loss(look.problem, look.final, look.meta)
            h = (before - after).detach()  # the outer terms cancel: h is the student's change
            nll = system.call_inner_loss(look.problem, "pseudo_label_nll", system.step_inputs(look, 0), look.t)
            surrogate = h * nll + after
        grads = torch.autograd.grad(surrogate, phi, allow_unused=True) if phi else ()
        self.state = detach_state(state)
        value = after.item()
        return HypergradOut(grads=list(grads), outer_loss=value,
                            metrics={"loss": value, "t": float(state["t"]), "feedback": h.item()})  # fmt: skip
