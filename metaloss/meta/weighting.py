"""Per-sample loss weights as meta-objects: the inner loss of a noisy-label run is a weighted sum of
per-sample losses, the weights coming from a module whose parameters are phi.

    L_inner(w) = sum_i v_i l_i / B          (normalize=True: / sum_i v_i)
    l_i = loss(f(x_i; w), y_i) per sample,  v_i = weighter(l_i)  with l_i detached (MW-Net's input)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.losses import get_loss


def seeded_mlp(sizes: Sequence[int], seed: int) -> nn.Sequential:
    """Linear layers of `sizes` with ReLU between them, PyTorch's default initialisation drawn from
    the module's own `seed` (not the global RNG)."""
    g, layers = torch.Generator().manual_seed(seed), []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(a, b)
        with torch.no_grad():
            bound = 1 / a**0.5
            linear.weight.uniform_(-bound, bound, generator=g)
            linear.bias.uniform_(-bound, bound, generator=g)
        layers += [linear] if i == len(sizes) - 2 else [linear, nn.ReLU()]
    return nn.Sequential(*layers)


class LossToWeight(nn.Module):
    """MW-Net's weighting function (Shu et al. 2019, "Meta-Weight-Net"): an MLP from a sample's loss
    to its weight in (0, 1), 1-100-1 with ReLU and a sigmoid output. l [B] -> v [B]."""

    def __init__(self, hidden: Sequence[int] = (100,), seed: int = 0) -> None:
        super().__init__()
        if not hidden or any(h < 1 for h in hidden):
            raise ConfigError(f"weight net hidden sizes must be >= 1, got {list(hidden)}")
        self.net = seeded_mlp([1, *hidden, 1], seed)

    def forward(self, losses: Tensor) -> Tensor:
        return torch.sigmoid(self.net(losses[:, None])).squeeze(1)  # [B]


class WeightedLoss(nn.Module):
    """A (logits, targets) -> scalar inner loss: the `loss`'s per-sample values weighted by
    `weighter` (fed with the detached per-sample losses; a weighter that sets `needs_context` gets
    (losses, logits, targets, context) instead, the `LossContext` of the batch, e.g. to run the
    model again). normalize: divide by the sum of the weights instead of the batch size (MW-Net's
    early code and L2RW; zero weights give a zero loss)."""

    def __init__(self, weighter: nn.Module, loss: str = "cross_entropy", normalize: bool = False) -> None:
        super().__init__()
        self.weighter, self.loss_name, self.normalize = weighter, loss, normalize
        self.per_sample = get_loss(loss)

    @property
    def needs_context(self) -> bool:
        return bool(getattr(self.weighter, "needs_context", False))

    def _weigh(self, losses: Tensor, logits: Tensor, targets: Tensor, context: Any) -> Tensor:
        if not self.needs_context:
            return self.weighter(losses.detach())
        if context is None:
            name = type(self.weighter).__name__
            raise ConfigError(f"{name} weighs samples from the model itself: it needs a LossContext (the inputs "
                              "and the model); ordinary training does not give one")  # fmt: skip
        return self.weighter(losses.detach(), logits.detach(), targets, context)

    def weights(self, logits: Tensor, targets: Tensor, context: Any = None) -> Tensor:
        """v [B] for a batch (what an analysis of clean and noisy rows reads)."""
        return self._weigh(self.per_sample(logits, targets, reduction="none"), logits, targets, context)

    def forward(self, logits: Tensor, targets: Tensor, context: Any = None) -> Tensor:
        losses = self.per_sample(logits, targets, reduction="none")  # [B]
        v = self._weigh(losses, logits, targets, context)  # [B]
        if self.normalize:
            return (v * losses).sum() / v.sum().clamp_min(1e-8)
        return (v * losses).mean()


class ModelFeatureRescaler(nn.Module):
    """Self-taught loss rescaling in the style of STORM (Heck et al. 2025): a sample's weight in (0, 1)
    from features of the model being trained only (no clean data, no label-noise prior),

        v_i = sigmoid(MLP([l_i, max_k p_ik, H(p_i), mean_s l_i^(s), std_s l_i^(s)])),

    l_i the sample's loss, p_i its softmax, H the entropy, and l_i^(s) its loss under `passes`
    stochastic forward passes of the model with dropout (rate `dropout`) on the inputs (the model
    need not have dropout layers). All features are detached. Its meta batches come from the noisy
    corpus itself, the rows it weighs highest (`LookaheadTraining(meta_source="train")`)."""

    needs_context = True
    FEATURES = ("loss", "confidence", "entropy", "dropout_loss_mean", "dropout_loss_std")

    def __init__(self, hidden: Sequence[int] = (32,), passes: int = 4, dropout: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        if passes < 2 or not 0 < dropout < 1:
            raise ConfigError(f"the rescaler needs passes >= 2 and 0 < dropout < 1, got {passes} and {dropout}")
        self.passes, self.dropout = passes, dropout
        self.net = seeded_mlp([len(self.FEATURES), *hidden, 1], seed)

    def features(self, losses: Tensor, logits: Tensor, targets: Tensor, context: Any) -> Tensor:
        """[B, 5]: the FEATURES of each sample, detached."""
        import torch.nn.functional as F

        with torch.no_grad():
            log_p = logits.log_softmax(-1)  # [B, C]
            confidence = log_p.max(-1).values.exp()
            entropy = -(log_p.exp() * log_p).sum(-1)
            noisy = torch.stack([F.cross_entropy(context.predict(F.dropout(context.inputs, self.dropout, True)),
                                                 targets, reduction="none") for _ in range(self.passes)])  # [S, B]
            return torch.stack([losses, confidence, entropy, noisy.mean(0), noisy.std(0, unbiased=False)], -1)

    def forward(self, losses: Tensor, logits: Tensor, targets: Tensor, context: Any) -> Tensor:
        return torch.sigmoid(self.net(self.features(losses, logits, targets, context))).squeeze(-1)  # [B]


class ExampleWeights(nn.Module):
    """L2RW (Ren et al. 2018, "Learning to Reweight Examples"): free per-example weights of the current
    minibatch, eps [B], from the meta-gradient at eps = 0,

        v_i = max(-g_i, 0) / sum_j max(-g_j, 0),   g = d L_meta(w_{t+1}(eps)) / d eps at eps = 0,

    then the real step on sum_i v_i l_i. Used with `AssignGradient` as the outer optimizer (eps <- g)
    and `LookaheadTraining(real_step="after_update")` with K = 1. Which of the two a call is comes from
    eps itself: with a graph (the look-ahead) the weights are eps - stop_gradient(eps), zero with the
    identity derivative; without one (the real step, which detaches phi) they are v * B, so that the
    `WeightedLoss`'s mean is sum_i v_i l_i. A batch without a positive v gets zero weights (no step)."""

    depends_on_sample = False  # a weight belongs to a batch position, not to a sample's loss

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"L2RW needs batch_size >= 1, got {batch_size}")
        self.eps = nn.Parameter(torch.zeros(batch_size))

    def forward(self, losses: Tensor) -> Tensor:
        b = len(losses)
        if b > len(self.eps):
            raise ConfigError(f"L2RW was built for minibatches of {len(self.eps)}, got {b}: set its batch_size")
        eps = self.eps[:b]
        if eps.requires_grad:
            return eps - eps.detach()  # [b] zeros, d/d eps = I
        v = torch.clamp(-eps, min=0)
        total = v.sum()
        return torch.where(total > 0, v * b / torch.where(total > 0, total, torch.ones_like(total)), v)


class AssignGradient(torch.optim.Optimizer):
    """The "optimizer" of L2RW's free weights: p <- lr * d L_meta / d p (no state; lr = 1 by default,
    and any lr > 0 gives L2RW the same normalised weights)."""

    def __init__(self, params: Any, lr: float = 1.0) -> None:
        if not lr > 0:
            raise ConfigError(f"AssignGradient needs lr > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(group["lr"] * p.grad)


def weight_separation(weights: Tensor, is_noisy: Tensor) -> dict[str, float]:
    """How well per-sample weights [N] separate clean from noisy rows (is_noisy [N] bool): the mean
    weight of each, and the AUC = P(v_clean > v_noisy) + P(v_clean = v_noisy) / 2 (Mann-Whitney, ties
    averaged; 0.5: no separation, 1: every clean row above every noisy one)."""
    weights, is_noisy = weights.detach().double().flatten(), is_noisy.flatten().bool()
    clean, noisy = ~is_noisy, is_noisy
    out = {"weight_clean": float(weights[clean].mean()) if clean.any() else float("nan"),
           "weight_noisy": float(weights[noisy].mean()) if noisy.any() else float("nan")}  # fmt: skip
    n_clean, n_noisy = int(clean.sum()), int(noisy.sum())
    if n_clean == 0 or n_noisy == 0:
        out["weight_auc"] = float("nan")
        return out
    values, inverse, counts = torch.unique(weights, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank (0-based) of each distinct value's first row
    ranks = (first + (counts - 1) / 2.0)[inverse] + 1  # [N] average ranks, 1-based
    u = ranks[clean].sum() - n_clean * (n_clean + 1) / 2
    out["weight_auc"] = float(u / (n_clean * n_noisy))
    return out
