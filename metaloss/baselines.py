"""Non-meta-learned baselines that meta-test the same way as meta-learned models."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from metaloss.types import TaskSampler, sample_episodes


def train_jointly(
    model: nn.Module,
    sampler: TaskSampler,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    steps: int,
    tasks_per_step: int,
    lr: float = 1e-3,
    first_index: int = 0,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The "pretrained" baseline of Finn et al. (2017): one network trained with Adam on the pooled
    support and query data of many tasks, as ordinary supervised learning. In place; returns `model`."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in tqdm(range(steps), desc="pretrain baseline", disable=not progress, dynamic_ncols=True):
        episodes = sample_episodes(sampler, first_index + step * tasks_per_step, tasks_per_step)
        x = torch.cat([torch.cat([e.support_x, e.query_x]) for e in episodes])  # [tasks * (K + Q), ...]
        y = torch.cat([torch.cat([e.support_y, e.query_y]) for e in episodes])
        if dtype is not None:
            x, y = x.to(dtype), (y.to(dtype) if y.is_floating_point() else y)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model
