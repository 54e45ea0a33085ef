"""Pseudo-labels from a teacher as a meta-object (Meta Pseudo Labels, Pham et al. 2021): the student,
the model of the run, trains on unlabelled rows against the teacher's labels; the teacher (phi) learns
from how the student's loss on labelled rows changes.

    L_inner(w) = (1/B) sum_i CE(S(x_i; w), yhat_i)        (hard: yhat_i ~ softmax(T(x_i; theta)))
    L_inner(w) = (1/B) sum_i CE(S(x_i; w), q_i)           (soft: q_i = softmax(T(x_i; theta) / tau))

Hard labels have no derivative in theta: the teacher's meta-gradient is MPL's feedback
(`metaloss.hypergrad.pseudo_label_feedback`); soft labels are differentiable, so the engine's exact
look-ahead meta-gradient applies. The teacher's own supervised loss on the labelled batch joins the
meta loss (`outer_terms`). Inner-loop labels are never read: the rows are unlabelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.meta.correction import soft_cross_entropy
from metaloss.meta.weighting import seeded_mlp

MODES = ("hard", "soft")


class PseudoLabelLoss(nn.Module):
    """See the module docstring. teacher: an MLP `in_features`-`hidden`-`n_classes` on the flattened
    inputs; mode: "hard" (labels drawn from the teacher, seeded by (seed, step)) or "soft";
    temperature: tau of the soft labels; supervised_weight: of the teacher's cross-entropy on the
    labelled batch in the meta loss."""

    needs_context = True
    reads_labels = False  # the inner loop's rows are unlabelled

    def __init__(self, n_classes: int, in_features: int, hidden: Sequence[int] = (128,), mode: str = "hard",
                 temperature: float = 1.0, supervised_weight: float = 1.0, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"unknown pseudo-label mode {mode!r}; expected one of {MODES}")
        if n_classes < 2 or in_features < 1 or any(h < 1 for h in hidden) or not temperature > 0 or (
                supervised_weight < 0):  # fmt: skip
            raise ConfigError(f"need n_classes >= 2, in_features >= 1, hidden sizes >= 1, temperature > 0 and "
                              f"supervised_weight >= 0, got {n_classes}, {in_features}, {list(hidden)}, "
                              f"{temperature}, {supervised_weight}")  # fmt: skip
        self.mode, self.temperature, self.supervised_weight, self.seed = mode, temperature, supervised_weight, seed
        self.teacher = seeded_mlp([in_features, *hidden, n_classes], seed)

    def teacher_logits(self, x: Tensor) -> Tensor:
        """T(x; theta) [B, C]."""
        return self.teacher(x.flatten(1).to(self.teacher[0].weight.dtype))

    def pseudo_labels(self, x: Tensor, step: int | None) -> Tensor:
        """The hard labels yhat [B] drawn from softmax(T(x)) for inner step `step` (the same every time
        it is asked for: the generator is seeded by (seed, step))."""
        if step is None:
            raise ConfigError("hard pseudo-labels are drawn per training step; the full objective has none")
        seeds = np.random.SeedSequence([self.seed, int(step), 17]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(seeds[0]) << 32 | int(seeds[1]))
        with torch.no_grad():
            p = self.teacher_logits(x).softmax(-1).double().cpu()  # [B, C]
        return torch.multinomial(p, 1, generator=g).squeeze(1).to(x.device)

    def corrected(self, logits: Tensor, targets: Tensor, context: Any) -> Tensor:
        """The teacher's label distribution [B, C] on the batch (what an analysis scores)."""
        return (self.teacher_logits(context.inputs) / self.temperature).softmax(-1)

    def forward(self, logits: Tensor, targets: Tensor, context: Any = None) -> Tensor:
        if context is None:
            raise ConfigError("pseudo-labelling runs the teacher on the inputs: it needs a LossContext; ordinary "
                              "training does not give one")  # fmt: skip
        if self.mode == "soft":
            return soft_cross_entropy(logits, self.corrected(logits, targets, context)).mean()
        return F.cross_entropy(logits, self.pseudo_labels(context.inputs, context.step))

    def pseudo_label_nll(self, x: Tensor, step: int) -> Tensor:
        """sum_i -log softmax(T(x_i))[yhat_i] over the rows of step `step` (MPL's score term)."""
        return F.cross_entropy(self.teacher_logits(x), self.pseudo_labels(x, step), reduction="sum")

    def outer_terms(self, x: Tensor, y: Tensor, first_row: int = 0) -> Tensor:
        return self.supervised_weight * F.cross_entropy(self.teacher_logits(x), y)
