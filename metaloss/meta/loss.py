"""Learned inner losses: `nn.Module`s whose parameters are meta-parameters.

The contract: `loss(prediction, target) -> scalar` (the mean over the batch), or with
`reduction="none"` the per-sample losses [n]. A loss that needs more than (prediction, target)
sets the class attribute `needs_context = True` and is called as
`loss(prediction, target, context)` with a `metaloss.types.LossContext` (the batch's inputs, the
adapted parameters, the inner step, the episode); the inner objective passes it, nothing else does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.losses import class_means, one_hot, reduce
from metaloss.models import MLP
from metaloss.types import LossContext


class ML3Loss(nn.Module):
    """ML3 for classification (Bechtle et al. 2021, "Meta Learning via Learned Loss"): one small
    network applied to each class's (softmax probability p_k, one-hot target y_k), made
    non-negative by a softplus and summed over the K classes:

        l(logits, y) = sum_k softplus(g_phi(p_k, y_k)),   p = softmax(logits)

    `residual=True`: cross-entropy plus the learned term, the network's last layer started at zero
    so that the loss starts as cross-entropy and the meta-gradient learns a correction to it
    (g is bounded, since its inputs are, so the sum stays a loss that a long training run can use):

        l(logits, y) = CE(logits, y) + sum_k g_phi(p_k, y_k)

    logits [n, K], target [n] class indices."""

    def __init__(self, hidden: Sequence[int] = (50, 50), residual: bool = False) -> None:
        super().__init__()
        self.hidden, self.residual = [int(h) for h in hidden], bool(residual)
        self.net = MLP(2, hidden, 1)
        if self.residual:
            nn.init.zeros_(self.net.head.weight)
            nn.init.zeros_(self.net.head.bias)

    def config(self) -> dict:
        """The constructor arguments that rebuild this module (`metaloss.io`)."""
        return {"hidden": self.hidden, "residual": self.residual}

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        _class_indices(target, type(self).__name__)
        features = torch.stack([logits.softmax(-1), one_hot(target, logits.shape[-1], logits.dtype)], -1)
        g = self.net(features).squeeze(-1)  # [n, K, 2] -> [n, K]
        if self.residual:
            per_sample = F.cross_entropy(logits, target, reduction="none") + g.sum(-1)
        else:
            per_sample = F.softplus(g).sum(-1)  # [n]
        return reduce(per_sample, reduction)


class ML3RegressionLoss(nn.Module):
    """ML3's regression form: a network on (x, prediction, target), softplus output,

        l(x, f(x), y) = softplus(g_phi([x, f(x), y]))

    as in ML3's shaped-sine experiment. prediction and target [n, d]; x from the context [n, d_x]."""

    needs_context = True

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (50, 50)) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"ML3 regression loss needs in_features, out_features >= 1, got {in_features}, "
                              f"{out_features}")  # fmt: skip
        self.in_features, self.out_features, self.hidden = in_features, out_features, [int(h) for h in hidden]
        self.net = MLP(in_features + 2 * out_features, hidden, 1)

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "hidden": self.hidden}

    def forward(self, prediction: Tensor, target: Tensor, context: LossContext, reduction: str = "mean") -> Tensor:
        x = context.inputs.reshape(len(prediction), -1)  # [n, d_x]
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"ML3 regression loss built for {self.in_features} input features, got {x.shape[-1]}")
        features = torch.cat([x, prediction.reshape(len(x), -1), target.reshape(len(x), -1)], -1)
        return reduce(F.softplus(self.net(features)).squeeze(-1), reduction)


class TaylorGLOLoss(nn.Module):
    """TaylorGLO (Gonzalez & Miikkulainen 2021): the third-order bivariate Taylor polynomial in
    (target x, prediction y) around a learned centre (c_x, c_y), without the terms in x alone
    (they have no gradient in y), with 8 parameters theta = (c_x, c_y, t_1 .. t_6):

        f(x, y) = t_1 (y - c_y) + t_2 (y - c_y)^2 / 2 + t_3 (y - c_y)^3 / 6 + t_4 (x - c_x)(y - c_y)
                  + t_5 (x - c_x)(y - c_y)^2 / 2 + t_6 (x - c_x)^2 (y - c_y) / 2

    applied to every class of (one-hot target, softmax probability) and summed, negated as in the
    paper: l = -sum_k f(y_k, p_k). The default theta gives a loss whose gradient in p_y is
    negative (more confidence in the target is rewarded): t_4 = 1, everything else 0."""

    def __init__(self, centre: tuple[float, float] = (0.0, 0.0),
                 coefficients: Sequence[float] = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0)) -> None:  # fmt: skip
        super().__init__()
        if len(coefficients) != 6:
            raise ConfigError(f"TaylorGLO has 6 coefficients (and a 2-number centre), got {len(coefficients)}")
        self.centre = nn.Parameter(torch.tensor([float(c) for c in centre]))
        self.coefficients = nn.Parameter(torch.tensor([float(c) for c in coefficients]))

    def config(self) -> dict:  # the values live in the weights; these only give the shapes
        return {}

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        _class_indices(target, type(self).__name__)
        y = logits.softmax(-1) - self.centre[1]  # [n, K]
        x = one_hot(target, logits.shape[-1], logits.dtype) - self.centre[0]
        t = self.coefficients
        f = t[0] * y + t[1] * y**2 / 2 + t[2] * y**3 / 6 + t[3] * x * y + t[4] * x * y**2 / 2 + t[5] * x**2 * y / 2
        return reduce(-f.sum(-1), reduction)


def _class_indices(target: Tensor, name: str) -> None:
    if target.is_floating_point():
        raise ConfigError(f"{name} is a classification loss (class-index targets) but the targets are real numbers; "
                          "for regression use inner_loss=ml3_regression")  # fmt: skip


class NPBMLLoss(nn.Module):
    """NPBML's task-adaptive loss (Raymond et al. 2024, "Meta-Learning Neural Procedural Biases",
    sec. 4.3), following the paper: three learned terms, each a small network with a softplus
    output,

        L = mean_{support} softplus(g_ind([z_i, y_i, CE(z_i, y_i)]))                  (inductive)
          + mean_{query}  softplus(g_tr([z_q, r_q, H(softmax z_q)]))                  (transductive)
          + mean_{layers} softplus(g_reg([mean w, std w, |w|_1 / n, |w|_2 / sqrt(n)])) (regulariser)

    z: logits [n, K], y: one-hot targets, r_qk: cosine similarity of the query's logits to class
    k's mean support logits (relation scores), H: entropy, w: each adapted parameter tensor (n its
    size; the norms are size-normalised so layers of different sizes are comparable). With `film`,
    every hidden layer h of g_ind and g_tr is modulated, h <- (1 + gamma(tau)) h + beta(tau), by
    FiLM layers (Perez et al. 2018) conditioned on the task statistics tau (the means of the
    inductive features over the support rows and of the transductive features over the query
    rows); gamma and beta start at zero, so FiLM starts as the identity. A term can be switched off
    (`transductive=False`, `regularizer=False`) for ablations. The query labels are never read.
    (The public NPBML code comments its FiLM out, calls the inductive network for the transductive
    term and computes its "L1" with p=2: this follows the paper.)"""

    needs_context = True

    def __init__(self, classes: int | None, hidden: Sequence[int] = (40, 40), transductive: bool = True,
                 regularizer: bool = True, film: bool = True) -> None:  # fmt: skip
        super().__init__()
        if classes is None:
            raise ConfigError("NPBML's loss is for classification episodes: it needs the number of classes "
                              "(inner_loss.classes, or a task with n_way)")  # fmt: skip
        if classes < 2 or not hidden or any(h < 1 for h in hidden):
            raise ConfigError(f"NPBML loss needs classes >= 2 and hidden sizes >= 1, got {classes}, {list(hidden)}")
        self.classes, self.hidden = int(classes), [int(h) for h in hidden]
        self.transductive, self.regularizer, self.film = bool(transductive), bool(regularizer), bool(film)
        features = 2 * self.classes + 1
        self.inductive_net = _FiLMNet(features, self.hidden, 2 * features if film else 0)
        if transductive:
            self.transductive_net = _FiLMNet(features, self.hidden, 2 * features if film else 0)
        if regularizer:
            self.regularizer_net = _FiLMNet(4, self.hidden, 0)

    def config(self) -> dict:
        return {"classes": self.classes, "hidden": self.hidden, "transductive": self.transductive,
                "regularizer": self.regularizer, "film": self.film}  # fmt: skip

    def forward(self, logits: Tensor, target: Tensor, context: LossContext, reduction: str = "mean") -> Tensor:
        _class_indices(target, type(self).__name__)
        if logits.shape[-1] != self.classes:
            raise ConfigError(f"NPBML loss built for {self.classes} classes, got logits for {logits.shape[-1]}")
        onehot = one_hot(target, self.classes, logits.dtype)  # [n, K]
        ce = F.cross_entropy(logits, target, reduction="none")  # [n]
        inductive = torch.cat([logits, onehot, ce[:, None]], -1)  # [n, 2K + 1]
        transductive = None
        if self.transductive or self.film:
            if context.predict is None:
                raise ConfigError("NPBML's transductive term and FiLM need the query predictions (LossContext.predict)")
            query = context.predict(context.episode.query_x)  # [m, K]
            prototypes = class_means(logits, onehot)  # [K, K]: mean logits per class
            relation = F.cosine_similarity(query[:, None, :], prototypes[None, :, :], dim=-1, eps=1e-8)  # [m, K]
            p = query.softmax(-1)
            entropy = -(p * query.log_softmax(-1)).sum(-1)  # [m]
            transductive = torch.cat([query, relation, entropy[:, None]], -1)  # [m, 2K + 1]
        task = None
        if self.film:
            assert transductive is not None
            task = torch.cat([inductive.mean(0), transductive.mean(0)])  # [2 (2K + 1)]
        per_sample = F.softplus(self.inductive_net(inductive, task)).squeeze(-1)  # [n]
        shared = per_sample.new_zeros(())
        if self.transductive:
            shared = shared + F.softplus(self.transductive_net(transductive, task)).mean()
        if self.regularizer and context.params:
            stats = torch.stack([_weight_statistics(w) for w in context.params.values()])  # [layers, 4]
            shared = shared + F.softplus(self.regularizer_net(stats, None)).mean()
        return reduce(per_sample + shared, reduction)


class _FiLMNet(nn.Module):
    """An MLP (ReLU) whose hidden layers may be FiLM-modulated by a conditioning vector:
    h <- (1 + gamma(c)) * h + beta(c), with gamma, beta linear in c and zero at the start."""

    def __init__(self, features: int, hidden: Sequence[int], conditioning: int) -> None:
        super().__init__()
        widths = [features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], 1)
        self.film = nn.ModuleList()
        if conditioning:
            for h in hidden:
                layer = nn.Linear(conditioning, 2 * h)
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
                self.film.append(layer)

    def forward(self, x: Tensor, condition: Tensor | None) -> Tensor:  # x [n, features] -> [n, 1]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.film and condition is not None:
                gamma, beta = self.film[i](condition).chunk(2, -1)  # [h], [h]
                x = (1 + gamma) * x + beta
            x = torch.relu(x)
        return self.out(x)


def _weight_statistics(w: Tensor) -> Tensor:
    """[mean, std, ||w||_1 / n, ||w||_2 / sqrt(n)] of a parameter tensor with n elements. The std of
    a constant tensor (a BatchNorm weight of ones or bias of zeros at initialisation) is 0 with zero
    first and second derivatives: torch's std has a NaN double backward there, which the unrolled
    meta-gradient needs, and sqrt(var + eps) a curvature of order 1 / sqrt(eps) that wrecks it."""
    flat = w.reshape(-1)
    var = flat.var(unbiased=False) if flat.numel() > 1 else flat.new_zeros(())
    positive = var > 0
    std = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))
    return torch.stack([flat.mean(), std, flat.abs().mean(), torch.sqrt((flat * flat).mean() + 1e-12)])
