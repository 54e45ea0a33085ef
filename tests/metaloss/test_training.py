"""Ordinary training through the outer loop equals a hand-written torch.optim loop step for step."""

from __future__ import annotations

import copy

import pytest
import torch

from metaloss.engine import MetaTrainer
from metaloss.errors import ConfigError
from metaloss.losses import poly1
from metaloss.meta import ML3RegressionLoss
from metaloss.models import MLP
from metaloss.training import MinibatchGradient, TrainingProblem
from tasks.classification import MinibatchSampler


def test_outer_loop_training_equals_a_plain_sgd_loop():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = MLP(5, (7,), 3).double()
    reference = copy.deepcopy(model)
    sampler = MinibatchSampler(x, y, batch_size=8, seed=1)
    problem = TrainingProblem(model, poly1)
    trainer = MetaTrainer(problem, MinibatchGradient(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                          sampler)  # type: ignore[arg-type]  # fmt: skip
    trainer.train(12, progress=False)  # 12 batches: more than one epoch of 5
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for i in range(12):
        batch = sampler.episode(i)
        optimizer.zero_grad()
        poly1(reference(batch.support_x), batch.support_y).backward()
        optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    epoch = torch.cat([sampler.episode(i).support_x for i in range(5)])  # one epoch: every row once
    assert torch.equal(epoch[epoch[:, 0].argsort()], x[x[:, 0].argsort()])


def test_a_loss_that_needs_a_meta_learning_context_is_refused():
    with pytest.raises(ConfigError, match="needs a meta-learning context"):
        TrainingProblem(MLP(1, (2,), 1), ML3RegressionLoss())
