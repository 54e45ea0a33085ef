"""Label correction as a meta-object: the model of a noisy-label run trains on soft labels that a
corrector network (phi) makes from the given (noisy) label, the corrector being meta-learned from
look-aheads scored on the clean meta set.

    L_inner(w) = (1/B) sum_i CE(f(x_i; w), q_i),   q_i = corrector(x_i, y~_i) in the simplex  [B, C]
    CE(logits, q) = - sum_c q_c log softmax(logits)_c

- `LabelCorrector` (MLC, Zheng et al. 2021, "Meta Label Correction for Noisy Label Learning"): q from
  stop-gradient features of the main model and an embedding of the noisy label;
- `GatedCorrector` (EMLC, Taraday & Baskin 2023, "Enhanced Meta Label Correction"): a teacher with
  its own network on the inputs, q = g y~ + (1 - g) p_T(x), the gate g = sigmoid(gate([h_T(x),
  e(y~)])), and the teacher's own losses on the clean meta batch (`outer_terms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.losses import one_hot
from metaloss.meta.weighting import seeded_mlp

FEATURES = ("logits", "inputs")


def soft_cross_entropy(logits: Tensor, q: Tensor) -> Tensor:
    """Per-sample - sum_c q_c log softmax(logits)_c, [B] (logits, q [B, C])."""
    return -(q * logits.log_softmax(-1)).sum(-1)


def flipped_labels(y: Tensor, n_classes: int, first_row: int = 0) -> Tensor:
    """A different class for every row, y + 1 + (i mod (C - 1)) mod C with i the row's place in its
    batch (first_row: that of y's first row, when y is a rank's share of a batch): each wrong class
    equally often over a batch, deterministic (EMLC's "retain" loss scores the gate on these)."""
    offset = 1 + (first_row + torch.arange(len(y), device=y.device)) % (n_classes - 1)
    return (y + offset) % n_classes


class LabelCorrector(nn.Module):
    """MLC's label-correction network: q = softmax(MLP([h, e(y~)])), h the stop-gradient `features`
    of each sample ("logits": the main model's logits, C numbers, model-agnostic where the paper
    takes the penultimate features; "inputs": the flattened inputs, `in_features` numbers), e a
    learned label embedding of size `embed`. `label_prior` adds that much to the logit of the given
    label, so that an untrained corrector starts near the given labels (0: the paper's)."""

    def __init__(self, n_classes: int, features: str = "logits", in_features: int | None = None,
                 hidden: Sequence[int] = (64,), embed: int = 16, label_prior: float = 0.0,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if features not in FEATURES:
            raise ConfigError(f"unknown corrector features {features!r}; expected one of {FEATURES}")
        if features == "inputs" and not in_features:
            raise ConfigError("a corrector on the inputs needs in_features (the flattened input size)")
        if n_classes < 2 or embed < 1 or any(h < 1 for h in hidden):
            raise ConfigError(f"need n_classes >= 2, embed >= 1 and hidden sizes >= 1, got {n_classes}, {embed}, "
                              f"{list(hidden)}")  # fmt: skip
        self.n_classes, self.features, self.label_prior = n_classes, features, label_prior
        width = n_classes if features == "logits" else int(in_features)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(seed + 1)
        self.embedding = nn.Parameter(torch.randn(n_classes, embed, generator=g))  # [C, E]
        self.net = seeded_mlp([width + embed, *hidden, n_classes], seed)

    def forward(self, logits: Tensor, targets: Tensor, context: Any) -> Tensor:
        """q [B, C] for the batch whose main-model `logits` [B, C] and noisy `targets` [B] are given."""
        h = logits.detach() if self.features == "logits" else context.inputs.flatten(1).detach()
        scores = self.net(torch.cat([h.to(self.embedding.dtype), self.embedding[targets]], -1))  # [B, C]
        if self.label_prior:
            scores = scores + self.label_prior * one_hot(targets, self.n_classes, scores.dtype)
        return scores.softmax(-1)


class GatedCorrector(nn.Module):
    """EMLC's teacher: a network of its own on the flattened inputs, h_T = body(x), p_T = softmax(head(h_T)),
    and a gate g = sigmoid(gate([h_T, e(y~)])) in (0, 1) mixing the given label and the teacher's
    prediction, q = g onehot(y~) + (1 - g) p_T. Its extra outer losses on a clean batch (x, y):
    `clean_weight` CE(head(h_T(x)), y) + `retain_weight` [BCE(g(x, y), 1) + BCE(g(x, y'), 0)] / 2,
    y' a wrong label (`flipped_labels`): the teacher learns to classify, and its gate to keep
    correct labels and override wrong ones."""

    def __init__(self, n_classes: int, in_features: int, hidden: Sequence[int] = (128,), embed: int = 16,
                 gate_hidden: Sequence[int] = (32,), clean_weight: float = 1.0, retain_weight: float = 1.0,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if n_classes < 2 or in_features < 1 or embed < 1 or not hidden or any(h < 1 for h in (*hidden, *gate_hidden)):
            raise ConfigError(f"need n_classes >= 2, in_features >= 1, embed >= 1 and hidden sizes >= 1, got "
                              f"{n_classes}, {in_features}, {embed}, {list(hidden)}, {list(gate_hidden)}")  # fmt: skip
        if clean_weight < 0 or retain_weight < 0:
            raise ConfigError(f"the teacher's loss weights must be >= 0, got {clean_weight} and {retain_weight}")
        self.n_classes, self.clean_weight, self.retain_weight = n_classes, clean_weight, retain_weight
        g = torch.Generator().manual_seed(seed + 1)
        self.embedding = nn.Parameter(torch.randn(n_classes, embed, generator=g))  # [C, E]
        self.body = nn.Sequential(seeded_mlp([in_features, *hidden], seed), nn.ReLU())
        self.head = seeded_mlp([hidden[-1], n_classes], seed + 2)
        self.gate = seeded_mlp([hidden[-1] + embed, *gate_hidden, 1], seed + 3)

    def _parts(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(teacher logits [B, C], gate logits [B]) for inputs x and given labels."""
        h = self.body(x.flatten(1).to(self.embedding.dtype))  # [B, H]
        return self.head(h), self.gate(torch.cat([h, self.embedding[targets]], -1)).squeeze(-1)

    def forward(self, logits: Tensor, targets: Tensor, context: Any) -> Tensor:
        teacher, gate = self._parts(context.inputs.detach(), targets)
        g = torch.sigmoid(gate)[:, None]  # [B, 1]
        return g * one_hot(targets, self.n_classes, teacher.dtype) + (1 - g) * teacher.softmax(-1)

    def outer_terms(self, x: Tensor, y: Tensor, first_row: int = 0) -> Tensor:
        teacher, keep = self._parts(x, y)
        _, drop = self._parts(x, flipped_labels(y, self.n_classes, first_row))
        retain = (F.binary_cross_entropy_with_logits(keep, torch.ones_like(keep))
                  + F.binary_cross_entropy_with_logits(drop, torch.zeros_like(drop))) / 2  # fmt: skip
        return self.clean_weight * F.cross_entropy(teacher, y) + self.retain_weight * retain


class CorrectedLoss(nn.Module):
    """The inner loss of label correction: the mean soft cross-entropy of the model against the
    corrector's labels q (see the module docstring). `outer_terms(x, y)`: the corrector's own outer
    losses on a clean batch, added to the look-ahead's meta loss (zero for MLC's corrector)."""

    needs_context = True

    def __init__(self, corrector: nn.Module) -> None:
        super().__init__()
        self.corrector = corrector

    def corrected(self, logits: Tensor, targets: Tensor, context: Any) -> Tensor:
        """q [B, C], the corrected labels of a batch (what an analysis compares with the true labels)."""
        if context is None:
            raise ConfigError("label correction reads the inputs and the model: it needs a LossContext; ordinary "
                              "training does not give one")  # fmt: skip
        return self.corrector(logits, targets, context)

    def forward(self, logits: Tensor, targets: Tensor, context: Any = None) -> Tensor:
        return soft_cross_entropy(logits, self.corrected(logits, targets, context)).mean()

    def outer_terms(self, x: Tensor, y: Tensor, first_row: int = 0) -> Tensor:
        terms = getattr(self.corrector, "outer_terms", None)
        return terms(x, y, first_row) if terms is not None else x.new_zeros(())
