"""Checkpointed reverse-mode equals the plain full unroll (float64), for every optimizer whose
hyperparameters are meta-learned, with a proximal regulariser, and for any segment length."""

from __future__ import annotations

import pytest
import torch
from test_unrolled import make_episodes, make_problem, summed_and_returned

from metaloss.errors import ConfigError
from metaloss.hypergrad import CheckpointedUnrolled, Unrolled
from metaloss.meta import Proximal

STEPS = 10


@pytest.mark.parametrize("inner_opt", ["sgd", "sgd_learned_lr", "momentum_learned", "adam_learned", "metasgd", "lslr"])
@pytest.mark.parametrize("segment", [1, 3, 4, None, 10, 25])
def test_equals_the_plain_unroll(inner_opt: str, segment: int | None) -> None:
    problem, episodes = make_problem(inner_opt, steps=STEPS), make_episodes(2)
    expected = Unrolled("full").estimate(problem, episodes)
    out = CheckpointedUnrolled(segment).estimate(problem, episodes)
    assert out.outer_loss == pytest.approx(expected.outer_loss, rel=1e-12)
    for got, want in zip(out.grads, expected.grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert out.metrics["checkpoints"] == -(-STEPS // (segment or 4))  # ceil(T / S); sqrt(10) -> 4


def test_with_a_proximal_regulariser_and_head_only_adaptation() -> None:
    problem, episodes = make_problem("momentum_learned", adapt=["head"], steps=STEPS), make_episodes(2)
    problem.inner_regularizer = Proximal(0.5)
    expected = Unrolled("full").estimate(problem, episodes).grads
    for got, want in zip(CheckpointedUnrolled(3).estimate(problem, episodes).grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bad_segment_is_rejected() -> None:
    with pytest.raises(ConfigError):
        CheckpointedUnrolled(0)


def test_minibatched_inner_loop_sees_the_same_batches_when_recomputed() -> None:
    problem, episodes = make_problem("sgd_learned_lr", steps=STEPS), make_episodes(1)
    problem.inner_batch_size = 2  # 6 support rows: the batch depends on the global step index
    expected = Unrolled("full").estimate(problem, episodes).grads
    for got, want in zip(CheckpointedUnrolled(3).estimate(problem, episodes).grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inner_opt", ["sgd_learned_lr", "adam_learned", "metasgd"])
@pytest.mark.parametrize("segment", [1, 3, None])
def test_trajectory_objective_equals_the_plain_unroll(inner_opt: str, segment: int | None) -> None:
    """meta_objective="inner_mean", J = (1/T) sum_t L_in(w_t), minibatched: each recomputed segment
    contributes its own steps' losses, and no terminal adjoint is carried."""
    problem, episodes = make_problem(inner_opt, steps=STEPS), make_episodes(2)
    problem.meta_objective, problem.inner_batch_size = "inner_mean", 4
    expected = Unrolled("full").estimate(problem, episodes)
    out = CheckpointedUnrolled(segment).estimate(problem, episodes)
    assert out.outer_loss == pytest.approx(expected.outer_loss, rel=1e-12)
    assert out.metrics["query_loss"] == pytest.approx(expected.metrics["query_loss"], rel=1e-12)
    for got, want in zip(out.grads, expected.grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(g.abs().max() > 0 for g in out.grads)


def test_the_task_loop_summed_in_grad_equals_the_sum_of_returned_gradients_bit_for_bit() -> None:
    """Each task's segment-by-segment gradient added into phi's .grad (`add_into_grad`) against the
    sum of returned ones, with the caller's .grad given back."""
    problem, episodes = make_problem("momentum_learned"), make_episodes(3)
    summed, returned = summed_and_returned(problem, episodes, CheckpointedUnrolled(segment=2)._task)
    assert any(g is not None for g in summed.grads)
    for a, b in zip(summed.grads, returned.grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
