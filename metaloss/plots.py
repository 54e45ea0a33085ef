"""Looking at a learned loss: its value along the axes a reader knows, beside the classic loss.

Classification (K classes): against the true-class probability p (logits log p on the true class
and log((1 - p) / (K - 1)) on the others) and against the logit margin m (logits m on the true
class, 0 on the others), beside cross-entropy. Regression: against the residual r (prediction
r, target 0, input 0), beside the squared error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metaloss.losses import cross_entropy
from metaloss.types import Episode, LossContext


@torch.no_grad()
def loss_curves(loss: nn.Module, n_classes: int = 10, points: int = 99) -> dict[str, Any]:
    """{axis name: (x values [points], learned loss [points], reference loss [points])}."""
    dtype = next((p.dtype for p in loss.parameters()), torch.float32)
    if getattr(loss, "needs_context", False) and hasattr(loss, "in_features"):  # ML3's regression form
        residual = torch.linspace(-3, 3, points, dtype=dtype)
        n_in, n_out = loss.in_features, loss.out_features
        x, target = torch.zeros(points, n_in, dtype=dtype), torch.zeros(points, n_out, dtype=dtype)
        prediction = residual.unsqueeze(-1).expand(points, n_out)
        context = LossContext(x, {}, None, Episode(x, target, x, target))
        learned = loss(prediction, target, context, reduction="none")
        return {"residual (input 0, target 0)": (residual, learned, (prediction - target).pow(2).mean(-1))}
    target = torch.zeros(points, dtype=torch.long)
    p = torch.linspace(0.01, 0.99, points, dtype=dtype)
    rest = ((1 - p) / (n_classes - 1)).log().unsqueeze(-1).expand(points, n_classes - 1)
    by_probability = torch.cat([p.log().unsqueeze(-1), rest], -1)  # [points, K]
    margin = torch.linspace(-5, 5, points, dtype=dtype)
    by_margin = torch.cat([margin.unsqueeze(-1), torch.zeros(points, n_classes - 1, dtype=dtype)], -1)
    curves = {}
    for name, axis, logits in (("true-class probability", p, by_probability), ("logit margin", margin, by_margin)):
        context = () if not getattr(loss, "needs_context", False) else (_self_context(logits, target),)
        curves[name] = (axis, loss(logits, target, *context, reduction="none"),
                        cross_entropy(logits, target, reduction="none"))  # fmt: skip
    return curves


def loss_figure(loss: nn.Module, n_classes: int = 10) -> Any:
    """A matplotlib figure of `loss_curves`, one panel per axis, the reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(loss, n_classes)
    reference = "squared error" if getattr(loss, "needs_context", False) else "cross-entropy"
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (name, (x, learned, ref)) in zip(axes[0], curves.items()):
        ax.plot(x.numpy(), learned.numpy(), label=f"learned ({type(loss).__name__})")
        ax.plot(x.numpy(), ref.numpy(), "--", color="gray", label=reference)
        ax.set_xlabel(name)
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_loss_plot(loss: nn.Module, path: str | Path, n_classes: int = 10) -> Path:
    """The figure as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = loss_figure(loss, n_classes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _self_context(logits: Tensor, target: Tensor) -> LossContext:
    """A context for a task-adaptive classification loss (NPBML's) on a grid of logits: the grid is
    its own query set, and there are no weights to regularise."""
    episode = Episode(logits, target, logits, target)
    return LossContext(logits, {}, None, episode, lambda x: x)
