"""A noise transition matrix as a meta-object: forward loss correction with T meta-learned from
look-aheads scored on the clean meta set.

    T_ij = P(noisy label j | clean label i) = softmax(theta_i)_j,   theta [C, C] the meta-parameters
    L_inner(w) = (1/B) sum_i -log (softmax(f(x_i; w)) T)_{y~_i}       (forward correction)

The model's softmax estimates the clean posterior; pushed through T it predicts the noisy label, so
the model is fitted to the noisy labels through the noise model and its own output stays an estimate
of the clean class (Patrini et al. 2017, "Making Deep Neural Networks Robust to Label Noise: a Loss
Correction Approach"). Patrini et al. and GLC (Hendrycks et al. 2018) estimate T once; Meta Transition
Adaptation (Wang, Hu & Chen 2020, "Training Noise-Robust Deep Neural Networks via Meta-Learning")
learns it, as here, from the meta-gradient of a clean loss after a look-ahead step on the corrected
loss. At test time the model alone is used (T only shapes training).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaloss.errors import ConfigError


def symmetric_transition(n_classes: int, rate: float) -> Tensor:
    """The transition matrix of symmetric noise at `rate`: 1 - rate on the diagonal, rate / (C - 1)
    elsewhere, [C, C] (rows: clean class, columns: noisy class)."""
    off = rate / (n_classes - 1)
    return torch.full((n_classes, n_classes), off).fill_diagonal_(1 - rate)


class TransitionLoss(nn.Module):
    """Forward-corrected cross-entropy with a learned transition matrix (see the module docstring).

    n_classes: C. init_rate: T starts as the symmetric-noise matrix at this rate (an uninformed guess
    of the noise level, not the true one; 0.5 by default: half of the labels wrong, spread evenly).
    learn: False keeps T at its start (plain forward correction with a fixed T, e.g. an oracle T
    given as `init_rate` = the true symmetric rate, for analysis)."""

    def __init__(self, n_classes: int, init_rate: float = 0.5, learn: bool = True) -> None:
        super().__init__()
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ConfigError(f"a transition matrix needs n_classes >= 2, got {n_classes!r}")
        if isinstance(init_rate, bool) or not isinstance(init_rate, (int, float)) or not 0 <= init_rate < 1:
            raise ConfigError(f"the transition matrix's init_rate must be in [0, 1), got {init_rate!r}")
        if init_rate >= 1 - 1 / n_classes:  # at 1 - 1/C, T is uniform: the loss no longer depends on the model
            raise ConfigError(f"init_rate {init_rate} >= 1 - 1/C = {1 - 1 / n_classes:.3f}: T would make the given "
                              "label no more likely than any other, and forward correction would not train the "
                              "model toward it")  # fmt: skip
        self.n_classes = n_classes
        start = symmetric_transition(n_classes, float(init_rate)).clamp_min(1e-6).log()  # [C, C]
        theta = start - start.logsumexp(1, keepdim=True)
        if learn:
            self.theta = nn.Parameter(theta)
        else:
            self.register_buffer("theta", theta)

    def transition(self) -> Tensor:
        """T [C, C], rows on the simplex."""
        return self.theta.softmax(1)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean -log (softmax(logits) T)[y~] over the batch (logits [B, C], targets [B])."""
        if logits.shape[-1] != self.n_classes:
            raise ConfigError(f"the transition matrix has {self.n_classes} classes, the model {logits.shape[-1]}")
        # log (p T)_j = logsumexp_i (log p_i + log T_ij): stable for confident models
        log_noisy = (logits.log_softmax(-1)[:, :, None] + self.theta.log_softmax(1)[None]).logsumexp(1)  # [B, C]
        return -log_noisy.gather(1, targets[:, None]).squeeze(1).mean()


def transition_error(estimate: Tensor, truth: Tensor) -> float:
    """Mean absolute entry-wise difference between two transition matrices, [C, C] each."""
    return (estimate - truth).abs().mean().item()


__all__ = ["TransitionLoss", "symmetric_transition", "transition_error"]
