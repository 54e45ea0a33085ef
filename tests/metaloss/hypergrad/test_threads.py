"""Tasks side by side on CPU threads (`threads=N`, metaloss/hypergrad/threads.py): every estimator
that runs tasks one by one must give the task loop's hypergradient and metrics bit for bit when
the loop runs at one intra-op thread, as each worker does (the loop itself is checked against
finite differences, a hand-written unroll and `higher` elsewhere): every inner optimizer and mode,
head-only adaptation, a learned loss, minibatched steps, checkpointed and implicit estimators, and
a Conv-4 with BatchNorm affine meta-parameters."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch
from test_es_batched import conv4_problem
from test_unrolled import make_episodes, make_problem
from test_unrolled_batched import KINDS, MODES

from metaloss.errors import ConfigError
from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad import CheckpointedUnrolled, Implicit, Unrolled
from metaloss.hypergrad.threads import pool, resolve_threads
from metaloss.meta import ML3RegressionLoss, PrototypeHeadInit, Proximal, RandomInit
from metaloss.models import MLP, Conv4


@contextmanager
def one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_identical(threaded, loop, reached: bool = True) -> None:
    assert threaded.outer_loss == loop.outer_loss
    assert threaded.metrics == loop.metrics
    assert [g is None for g in threaded.grads] == [g is None for g in loop.grads]
    assert reached == any(g is not None and g.abs().max() > 0 for g in loop.grads)
    for x, y in zip(threaded.grads, loop.grads):
        if y is not None:
            assert torch.equal(x, y)


def both(make_estimator, problem, episodes, threads=2):
    with one_intra_op_thread():
        loop = make_estimator(1).estimate(problem, episodes)
    return make_estimator(threads).estimate(problem, episodes), loop


@pytest.mark.parametrize("mode,truncation", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_threaded_tasks_give_the_loops_hypergradient_bit_for_bit(kind: str, mode: str, truncation: int | None) -> None:
    threaded, loop = both(lambda t: Unrolled(mode, truncation, threads=t), make_problem(kind), make_episodes(5))
    assert_identical(threaded, loop, reached=not (kind == "sgd" and mode == "truncated"))  # nothing learned reached


@pytest.mark.parametrize("objective", ["query", "inner_mean"])
def test_head_only_adaptation_reaches_the_body_through_the_threads_model_copies(objective: str) -> None:
    problem = dataclasses.replace(make_problem("momentum_learned", adapt=("head",)), meta_objective=objective)
    threaded, loop = both(lambda t: Unrolled(threads=t), problem, make_episodes(3))
    assert_identical(threaded, loop)
    init = [n for n, _ in problem.init.named_parameters()]
    body = [g for n, g in zip(init, threaded.grads) if ".head." not in n]
    assert body and all(g is not None and g.abs().max() > 0 for g in body)  # the body's w0 is reached


def test_a_learned_loss_and_minibatched_inner_steps() -> None:
    torch.manual_seed(3)
    loss = ML3RegressionLoss(2, 1, hidden=(6,)).double()
    problem = dataclasses.replace(make_problem("adam_learned"), inner_loss=loss)
    problem.inner_batch_size, problem.shuffle_seed = 4, 7
    for mode, truncation in MODES:
        assert_identical(*both(lambda t, m=mode, k=truncation: Unrolled(m, k, threads=t), problem, make_episodes(4)))


def test_a_fresh_random_initialisation_per_episode_is_drawn_as_in_the_loop() -> None:
    """ML3's set-up: w0 drawn per episode (`RandomInit` reseeds the global generator, under a lock)
    and a learned loss as phi; 8 tasks on 3 threads draw the loop's initialisations."""
    torch.manual_seed(3)
    problem = make_problem("sgd")
    problem = dataclasses.replace(problem, init=RandomInit(problem.model, seed=5),
                                  inner_loss=ML3RegressionLoss(2, 1, hidden=(6,)).double())  # fmt: skip
    assert_identical(*both(lambda t: Unrolled(threads=t), problem, make_episodes(8), threads=3))


def test_checkpointed_and_implicit_estimators() -> None:
    assert_identical(*both(lambda t: CheckpointedUnrolled(2, threads=t), make_problem("momentum_learned"),
                           make_episodes(3)))  # fmt: skip
    problem = dataclasses.replace(make_problem("sgd"), inner_regularizer=Proximal(2.0), inner_steps=20)
    assert_identical(*both(lambda t: Implicit("cg", 5, threads=t), problem, make_episodes(3)))


def test_conv4_with_batchnorm_affine_meta_parameters_in_float32_and_float64() -> None:
    problem, episodes = conv4_problem()
    episodes = episodes + episodes[::-1]
    for mode in ("full", "first_order"):
        assert_identical(*both(lambda t, m=mode: Unrolled(m, threads=t), problem, episodes))
    problem.model.float()
    problem = dataclasses.replace(problem)  # meta-modules follow the model's dtype
    episodes = [e.to(dtype=torch.float32) for e in episodes]
    assert_identical(*both(lambda t: Unrolled(threads=t), problem, episodes, threads=3))


def test_conv4_with_prototype_heads_computed_per_episode() -> None:
    """Proto-MAML's head (`PrototypeHeadInit`) runs the shared model's body on each task's support set
    from the worker threads, with phi's graph through the prototypes."""
    problem, episodes = conv4_problem()
    problem = dataclasses.replace(problem, init=PrototypeHeadInit(problem.model))
    assert_identical(*both(lambda t: Unrolled(threads=t), problem, episodes + episodes[::-1]))


def test_conv4_with_per_step_batchnorm() -> None:
    problem, episodes = conv4_problem("batch_per_step")
    assert resolve_threads(2, problem.model, 2, torch.device("cpu")) == 2  # no running statistics: allowed
    assert_identical(*both(lambda t: Unrolled(threads=t), problem, episodes + episodes[::-1]))


def test_workers_run_one_intra_op_thread_and_leave_the_callers_count() -> None:
    before = torch.get_num_threads()
    workers = pool(2)
    counts = list(workers.map(lambda _: torch.get_num_threads(), range(8)))
    assert counts == [1] * 8
    assert torch.get_num_threads() == before


def test_a_forked_child_starts_its_own_workers() -> None:
    """A child forked after the parent started its pool has none of its threads: it must not wait
    on them forever."""
    import multiprocessing

    pool(2)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as children:
        counts = children.apply_async(_child_worker_counts).get(timeout=60)
    assert counts == [1, 1]


def _child_worker_counts() -> list[int]:
    return list(pool(2).map(lambda _: torch.get_num_threads(), range(2)))


def test_auto_threads_convolutional_models_on_a_cpu_and_loops_elsewhere() -> None:
    conv = apply_batchnorm_policy(Conv4(3, 1, 4, 12), "transductive")
    cpu = torch.device("cpu")
    with one_intra_op_thread():
        assert resolve_threads("auto", conv, 8, cpu) == 1  # one core: the loop
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert resolve_threads("auto", conv, 8, cpu) == 2
        assert resolve_threads("auto", conv, 1, cpu) == 1  # one task
        assert resolve_threads("auto", MLP(1, [8], 1), 8, cpu) == 1  # tiny ops wait on the GIL: batched instead
        assert resolve_threads("auto", conv, 8, torch.device("meta")) == 1
        assert resolve_threads(4, conv, 3, cpu) == 3  # never more threads than tasks
    finally:
        torch.set_num_threads(before)


def test_auto_loops_where_workers_cannot_be_pinned(monkeypatch) -> None:
    """A torch build without per-thread intra-op counts: `auto` runs the loop, threads=N says why."""
    from metaloss.hypergrad import threads

    def refuse(workers: int):
        raise ConfigError("hypergrad.threads: this torch build cannot pin worker threads")

    monkeypatch.setattr(threads, "pool", refuse)
    conv = apply_batchnorm_policy(Conv4(3, 1, 4, 12), "transductive")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert resolve_threads("auto", conv, 8, torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(before)
    problem, episodes = conv4_problem()
    with pytest.raises(ConfigError, match="cannot pin"):
        Unrolled(threads=2).estimate(problem, episodes)


def test_models_whose_tasks_cannot_run_side_by_side_are_refused_or_looped() -> None:
    cpu = torch.device("cpu")
    dropout = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Dropout(0.5))
    running = Conv4(3, 1, 4, 12)  # BatchNorm with running statistics, in training mode
    for model, reason in ((dropout, "dropout"), (running, "running statistics")):
        assert resolve_threads("auto", model, 8, cpu) == 1
        with pytest.raises(ConfigError, match=reason):
            resolve_threads(2, model, 8, cpu)
    assert resolve_threads(2, running.eval(), 8, cpu) == 2  # frozen statistics are read only
    for bad in (0, -1, True, "two", 1.5):
        with pytest.raises(ConfigError, match="threads"):
            Unrolled(threads=bad)
