"""Plain data types shared by the library and the task samplers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

Params = dict[str, Tensor]
"""Named tensors: inner parameters w, or gradients/updates with the same keys."""


@dataclass
class Episode:
    """One task of the inner problem: support (inner) data and query (outer) data.

    support_x: [n_support, *input_shape]    support_y: [n_support, *target_shape]
    query_x:   [n_query, *input_shape]      query_y:   [n_query, *target_shape]
    meta: anything the sampler knows (classes, amplitude, domain, noise mask, ...).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: Any = None, dtype: Any = None) -> Episode:
        """Move inputs to `device`; floating tensors are also cast to `dtype` when given."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return Episode(move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y), self.meta)


@dataclass
class HypergradOut:
    """What an estimator returns for a meta-batch.

    grads: d L_outer / d phi, one tensor per meta-parameter (same order as `meta_params`);
           None where phi does not influence the outer loss.
    outer_loss: mean outer (query) loss over the meta-batch, after adaptation.
    metrics: scalars worth logging (inner loss, accuracy, solver residuals, ...).
    """

    grads: list[Tensor | None]
    outer_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class TaskSampler(Protocol):
    """The task-sampler contract (implemented in `tasks/`): a random-access family of episodes."""

    def episode(self, index: int) -> Episode:
        """The episode number `index` (deterministic given the sampler's seed)."""
        ...


def sample_episodes(sampler: TaskSampler, start: int, count: int) -> list[Episode]:
    """Episodes start .. start + count - 1."""
    return [sampler.episode(i) for i in range(start, start + count)]


@dataclass
class LossContext:
    """What a learned inner loss may read beyond (prediction, target), given only to losses that set
    `needs_context = True` (the learned-loss contract, `metaloss.meta.loss`): the inputs of the rows
    the prediction is for [n, ...], the adapted parameters w_t, the global inner step t (None: the
    full objective), the episode (its query inputs, for a transductive term; never its hidden
    metadata) and `predict(x)`, the model with w_t (and the frozen parameters) on other inputs, e.g.
    the query logits a transductive term scores."""

    inputs: Tensor
    params: Params
    step: int | None
    episode: Episode
    predict: Callable[[Tensor], Tensor] | None = None
