"""Tasks as one batch: `Unrolled(batched=True)` runs the meta-batch's inner loops in one
`torch.func.vmap` and differentiates them with `torch.func.grad`. It must give the hypergradient of
the task-by-task loop (autograd; itself checked against finite differences and a hand-written
unroll in test_unrolled.py) in float64: every inner optimizer and mode, head-only adaptation, a
learned loss, both meta-objectives, minibatched steps, chunks, and a Conv-4 with BatchNorm affine
meta-parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_es_batched import conv4_problem
from test_unrolled import make_episodes, make_problem

from metaloss.engine import evaluate
from metaloss.errors import ConfigError
from metaloss.hypergrad import Unrolled
from metaloss.hypergrad.base import chunk_for_budget, saved_bytes_per_task
from metaloss.meta import ML3RegressionLoss
from metaloss.types import Episode

KINDS = ["sgd", "sgd_learned_lr", "momentum_learned", "adam_learned", "metasgd", "lslr"]
MODES = [("full", None), ("first_order", None), ("truncated", 1)]


def assert_same(batched, loop) -> None:
    assert batched.outer_loss == pytest.approx(loop.outer_loss, rel=1e-10)
    assert batched.metrics.keys() == loop.metrics.keys()
    for k in loop.metrics:
        assert batched.metrics[k] == pytest.approx(loop.metrics[k], rel=1e-10, abs=1e-12), k
    assert [g is None for g in batched.grads] == [g is None for g in loop.grads]
    for x, y in zip(batched.grads, loop.grads):
        if y is not None:
            assert y.abs().max() > 0
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def both(problem, episodes, mode="full", truncation=None, chunk=None):
    loop = Unrolled(mode, truncation).estimate(problem, episodes)
    batched = Unrolled(mode, truncation, batched=True, chunk=chunk).estimate(problem, episodes)
    return batched, loop


@pytest.mark.parametrize("mode,truncation", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_tasks_give_the_loops_hypergradient(kind: str, mode: str, truncation: int | None) -> None:
    assert_same(*both(make_problem(kind), make_episodes(3), mode, truncation))


def test_truncation_leaves_the_initialisation_unreached_as_the_loop_does() -> None:
    batched, loop = both(make_problem("sgd_learned_lr"), make_episodes(2), "truncated", 1)
    assert any(g is None for g in loop.grads)  # w0 is cut off by the truncation
    assert_same(batched, loop)


@pytest.mark.parametrize("objective", ["query", "inner_mean"])
def test_head_only_adaptation_and_both_meta_objectives(objective: str) -> None:
    problem = dataclasses.replace(make_problem("momentum_learned", adapt=("head",)), meta_objective=objective)
    assert_same(*both(problem, make_episodes(3)))
    problem.reuse_features = False
    assert_same(*both(problem, make_episodes(3)))


def test_a_learned_loss_that_reads_its_context() -> None:
    torch.manual_seed(3)
    problem = dataclasses.replace(make_problem("sgd"), inner_loss=ML3RegressionLoss(2, 1, hidden=(6,)).double())
    for mode, truncation in MODES:
        assert_same(*both(problem, make_episodes(3), mode, truncation))


def test_minibatched_inner_steps_and_chunks() -> None:
    problem = make_problem("adam_learned")
    problem.inner_batch_size, problem.shuffle_seed = 4, 7
    for chunk in (None, 1, 2):
        assert_same(*both(problem, make_episodes(3), chunk=chunk))


def test_conv4_with_batchnorm_affine_meta_parameters() -> None:
    problem, episodes = conv4_problem()
    batchnorm = [m for m in problem.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    phi = {id(p) for p in problem.meta_parameters()}
    init = dict(problem.init.named_parameters())
    affine = [n for n, m in problem.model.named_modules() if m in batchnorm]
    assert affine and all(id(init[f"model.{n}.weight"]) in phi for n in affine)  # BatchNorm affine weights are phi
    for mode, truncation in MODES[:2]:
        assert_same(*both(problem, episodes, mode, truncation))


def test_a_graph_budget_chooses_the_chunk_and_keeps_the_hypergradient() -> None:
    problem, episodes = make_problem("adam_learned"), make_episodes(5)
    per_task = saved_bytes_per_task(problem, episodes[0], Unrolled()._task_loss)
    assert per_task > 0
    e = episodes[0]
    wider = Episode(e.support_x, e.support_y, torch.cat([e.query_x] * 4), torch.cat([e.query_y] * 4))
    assert saved_bytes_per_task(problem, wider, Unrolled()._task_loss) > per_task  # more query rows saved
    for tasks_fitting, expected in ((0.5, 1), (2, 2), (2.9, 2), (5, 5), (100, 5)):
        estimator = Unrolled(batched=True, graph_budget_mb=tasks_fitting * per_task / 2**20)
        assert estimator.chunk_for(problem, episodes) == expected
        assert_same(estimator.estimate(problem, episodes), Unrolled().estimate(problem, episodes))
    assert chunk_for_budget(1.0, 2**20 // 3 + 1, 10) == 2 and chunk_for_budget(1e-9, 10, 4) == 1
    with pytest.raises(ConfigError, match="graph_budget_mb"):
        Unrolled(batched=True, chunk=2, graph_budget_mb=10)
    with pytest.raises(ConfigError, match="graph_budget_mb"):
        Unrolled(batched=True, graph_budget_mb=0)


class Fixed:
    """A sampler over a fixed list of episodes."""

    def __init__(self, episodes: list[Episode]) -> None:
        self.episodes = episodes

    def episode(self, i: int) -> Episode:
        return self.episodes[i]


def test_conv4_with_per_step_batchnorm() -> None:
    problem, episodes = conv4_problem("batch_per_step")
    for mode, truncation in MODES:
        assert_same(*both(problem, episodes, mode, truncation))


@pytest.mark.parametrize("norm", ["batch", "batch_per_step"])
def test_meta_test_of_a_conv4_with_batchnorm_batched_equals_the_loop(norm: str) -> None:
    problem, episodes = conv4_problem(norm)
    loop = evaluate(problem, Fixed(episodes), 2, steps=(0, 2, 4))
    batched = evaluate(problem, Fixed(episodes), 2, steps=(0, 2, 4), batch_tasks=2)
    for k in loop:
        assert batched[k] == pytest.approx(loop[k], rel=1e-10, abs=1e-12), k


def test_episodes_of_different_shapes_are_refused() -> None:
    episodes = make_episodes(2)
    e = episodes[1]
    episodes[1] = Episode(e.support_x[:4], e.support_y[:4], e.query_x, e.query_y)
    with pytest.raises(ConfigError, match="one shape"):
        Unrolled(batched=True).estimate(make_problem("sgd"), episodes)
    with pytest.raises(ConfigError, match="one shape"):
        evaluate(make_problem("sgd"), Fixed(episodes), 2, steps=(1,), batch_tasks=2)
    with pytest.raises(ConfigError, match="chunk"):
        Unrolled(batched=True, chunk=0)


def test_auto_batches_a_multilayer_perceptron_and_loops_over_a_convnet_or_what_cannot_be_batched() -> None:
    mlp, conv = make_problem("sgd_learned_lr"), conv4_problem()[0]
    auto = Unrolled(batched="auto")
    assert auto.batches(mlp, make_episodes(4))
    assert not auto.batches(mlp, make_episodes(3))  # too few tasks to pay (measured)
    conv_episodes = conv4_problem()[1]
    assert not auto.batches(conv, conv_episodes + conv_episodes)  # measured slower batched on a CPU
    ragged = make_episodes(4)
    ragged[1] = Episode(ragged[1].support_x[:4], ragged[1].support_y[:4], ragged[1].query_x, ragged[1].query_y)
    assert not auto.batches(mlp, ragged)  # the loop, where a vmap would refuse
    assert_same(auto.estimate(mlp, make_episodes(4)), Unrolled().estimate(mlp, make_episodes(4)))
    assert auto.estimate(mlp, ragged).grads[0] is not None
    with pytest.raises(ConfigError, match="batched must be"):
        Unrolled(batched="sometimes")


def test_auto_falls_back_to_the_loop_where_vmap_refuses_an_operation() -> None:
    def loss_with_a_data_dependent_branch(prediction, target):
        return ((prediction - target) ** 2).mean() * (2.0 if bool(target.sum() > 0) else 1.0)

    problem = dataclasses.replace(make_problem("sgd_learned_lr"), inner_loss=loss_with_a_data_dependent_branch)
    with pytest.raises(RuntimeError, match="vmap"):
        Unrolled(batched=True).estimate(problem, make_episodes(4))
    auto = Unrolled(batched="auto")
    with pytest.warns(UserWarning, match="vmap refused"):
        out = auto.estimate(problem, make_episodes(4))
    assert auto.vmap_refused and not auto.batches(problem, make_episodes(4))
    assert_same(out, Unrolled().estimate(problem, make_episodes(4)))
