"""Ordinary training, e.g. with a learned loss plugged in, as the degenerate case of the one outer
loop (`metaloss.engine.MetaTrainer`): "phi" is the model's weights, the "estimate" is the plain
gradient of the loss on one minibatch (the episode's support set), and the outer optimizer is the
training optimizer. So an ordinary run checkpoints, resumes bitwise and stops on non-finite steps
like every meta-training run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.types import Episode, HypergradOut


class TrainingProblem:
    """The model whose weights are trained, in the shape the outer loop reads from a problem."""

    inner_opt = None

    def __init__(self, model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        if getattr(loss, "needs_context", False):
            raise ConfigError(f"{type(loss).__name__} needs a meta-learning context (inputs, adapted weights or an "
                              "episode's query set); ordinary training takes a loss of (logits, targets)")  # fmt: skip
        self.model, self.loss = model, loss

    def meta_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.model.load_state_dict(state["model"])


class MinibatchGradient:
    """d loss(model(x_b), y_b) / d weights on the meta-step's minibatch (the episode's support set)."""

    def updates(self, problem: TrainingProblem, episodes: Sequence[Episode]) -> Any:
        yield self.estimate(problem, episodes)

    def estimate(self, problem: TrainingProblem, episodes: Sequence[Episode]) -> HypergradOut:
        (batch,) = episodes
        params = problem.meta_parameters()
        with torch.enable_grad():
            loss = problem.loss(problem.model(batch.support_x), batch.support_y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return HypergradOut(grads=list(grads), outer_loss=loss.item(), metrics={"loss": loss.item()})

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on (x [N, ...], y [N])."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch):
        logits = model(x[start : start + batch])
        total_loss += torch.nn.functional.cross_entropy(logits, y[start : start + batch], reduction="sum").item()
        correct += int((logits.argmax(-1) == y[start : start + batch]).sum())
    model.train()
    return {"loss": total_loss / len(x), "accuracy": correct / len(x)}
