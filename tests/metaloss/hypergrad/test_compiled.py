"""Compiled tasks: `Unrolled(compile=True)` computes each task's meta-gradient with one
`torch.compile`d `torch.func` function. It must give the hypergradient of the autograd task loop
(itself checked against finite differences and a hand-written unroll in test_unrolled.py) in
float64: every inner optimizer and mode, head-only adaptation, a learned loss, a Conv-4 with
BatchNorm affine meta-parameters, per-step BatchNorm, in the loop and in threads; what it cannot
compile (minibatched steps among them) is refused with one clear error.
Most cases trace with the "aot_eager" backend (dynamo and AOTAutograd, the compiled graph run
without code generation: seconds); two run Inductor's generated C++ kernels (an MLP, a conv net)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_es_batched import conv4_problem
from test_unrolled import make_episodes, make_problem
from test_unrolled_batched import KINDS, MODES, assert_same

from metaloss.errors import ConfigError
from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad import Unrolled, unrolled
from metaloss.hypergrad.compiled import CPU_INDUCTOR_OPTIONS
from metaloss.losses import cross_entropy
from metaloss.meta import HyperparameterOptimizer, LearnedInit, ML3RegressionLoss
from metaloss.models import PerStepBatchNorm2d
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def both(problem, episodes, mode="full", truncation=None, threads=1, backend="aot_eager"):
    loop = Unrolled(mode, truncation).estimate(problem, episodes)
    compiled = Unrolled(mode, truncation, compile=True, compile_backend=backend, threads=threads)
    return compiled.estimate(problem, episodes), loop


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_tasks_give_the_loops_hypergradient(kind: str) -> None:
    assert_same(*both(make_problem(kind), make_episodes(3)))


@pytest.mark.parametrize("mode,truncation", MODES[1:])
def test_first_order_and_truncated_modes(mode: str, truncation: int) -> None:
    assert_same(*both(make_problem("momentum_learned"), make_episodes(3), mode, truncation))


def test_inductor_kernels_give_the_loops_hypergradient() -> None:
    problem, episodes = make_problem("lslr"), make_episodes(3)
    assert_same(*both(problem, episodes, backend="inductor"))


def test_inductor_convolutions_in_nchw_layout_give_the_loops_hypergradient() -> None:
    """The path that `CPU_INDUCTOR_OPTIONS` changes: Inductor's convolution kernels without its
    channels-last layout, launched from its C++ wrapper, on a small conv net with transductive
    BatchNorm (affine meta-parameters)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(75, 3))  # fmt: skip
    model = apply_batchnorm_policy(model.double(), "transductive")
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.2), cross_entropy,
                             cross_entropy, 1)  # fmt: skip
    _, episodes = conv4_problem()  # 3-way 1-shot, 12x12 single-channel images
    assert CPU_INDUCTOR_OPTIONS == {"layout_optimization": False, "cpp_wrapper": True}
    assert_same(*both(problem, episodes, backend="inductor"))
    # the same kernels called from two worker threads at once (what threads=auto runs on a CPU)
    assert_same(*both(problem, episodes, backend="inductor", threads=2))


def test_truncation_leaves_the_initialisation_unreached_as_the_loop_does() -> None:
    compiled, loop = both(make_problem("sgd_learned_lr"), make_episodes(2), "truncated", 1)
    assert any(g is None for g in loop.grads)  # w0 is cut off by the truncation
    assert_same(compiled, loop)


def test_head_only_adaptation_and_a_learned_loss() -> None:
    problem = make_problem("momentum_learned", adapt=("head",))
    assert_same(*both(problem, make_episodes(3)))
    torch.manual_seed(3)
    learned = dataclasses.replace(make_problem("sgd"), inner_loss=ML3RegressionLoss(2, 1, hidden=(6,)).double())
    assert_same(*both(learned, make_episodes(3)))


@pytest.mark.parametrize("norm", ["batch", "batch_per_step"])
def test_conv4_with_batchnorm_affine_meta_parameters_in_the_loop_and_in_threads(norm: str) -> None:
    problem, episodes = conv4_problem(norm)
    assert any(isinstance(m, (torch.nn.BatchNorm2d, PerStepBatchNorm2d)) for m in problem.model.modules())
    for mode in ("full", "first_order"):
        loop = Unrolled(mode).estimate(problem, episodes)
        estimator = Unrolled(mode, compile=True, compile_backend="aot_eager")
        assert_same(estimator.estimate(problem, episodes), loop)
        estimator.threads = 2  # the same compiled function, called from two worker threads at once
        assert_same(estimator.estimate(problem, episodes), loop)


def test_each_episode_shape_compiles_once_and_many_problems_share_a_process() -> None:
    problem, episodes = make_problem("sgd"), make_episodes(4)
    e = episodes[1]
    episodes[1] = episodes[3] = Episode(e.support_x[:4], e.support_y[:4], e.query_x, e.query_y)
    estimator = Unrolled(compile=True, compile_backend="aot_eager")
    assert_same(estimator.estimate(problem, episodes), Unrolled().estimate(problem, episodes))
    assert len(estimator.compiled.shapes) == 2
    for _ in range(8):  # more problems than dynamo's recompile limit (8) for one code object
        assert_same(*both(make_problem("sgd"), make_episodes(2)))
    estimator.compiled.shapes |= {("shape", i) for i in range(torch._dynamo.config.recompile_limit)}
    with pytest.raises(ConfigError, match="at most 8 shapes"):  # a ninth shape
        estimator.estimate(problem, [Episode(e.support_x[:3], e.support_y[:3], e.query_x, e.query_y)])


def test_what_a_compiled_task_cannot_do_is_refused() -> None:
    problem, episodes = make_problem("sgd"), make_episodes(2)
    dropout = dataclasses.replace(problem, model=torch.nn.Sequential(problem.model, torch.nn.Dropout(0.5)))
    with pytest.raises(ConfigError, match="dropout"):
        Unrolled(compile=True, compile_backend="aot_eager").estimate(dropout, episodes)
    features = episodes[0].support_x.shape[1]
    running = dataclasses.replace(problem, model=torch.nn.Sequential(torch.nn.BatchNorm1d(features).double(),
                                                                      problem.model))  # fmt: skip
    with pytest.raises(ConfigError, match="running statistics"):
        Unrolled(compile=True, compile_backend="aot_eager").estimate(running, episodes)
    minibatched = make_problem("adam_learned")  # its minibatch order is drawn by numpy: not traceable
    minibatched.inner_batch_size, minibatched.shuffle_seed = 4, 7
    with pytest.raises(ConfigError, match="cannot compile this task whole"):
        Unrolled(compile=True, compile_backend="aot_eager").estimate(minibatched, episodes)
    with pytest.raises(ConfigError, match="compile backend"):
        Unrolled(compile=True, compile_backend="tvm")


def test_tasks_in_threads_run_the_graph_compiled_for_one_intra_op_thread() -> None:
    torch.set_num_threads(2)  # the workers run with one each: compiled under 2, dynamo would compile again
    problem, episodes = make_problem("sgd"), make_episodes(4)
    loop = Unrolled().estimate(problem, episodes)
    estimator = Unrolled(compile=True, compile_backend="aot_eager", threads=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(2):
        assert_same(estimator.estimate(problem, episodes), loop)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    assert torch.get_num_threads() == 2


def test_threads_auto_runs_compiled_tasks_as_it_runs_uncompiled_ones(monkeypatch) -> None:
    """auto: one worker per intra-op thread for a convnet on a CPU, the loop for an MLP (`resolve_threads`)."""
    torch.set_num_threads(2)
    problem, episodes = conv4_problem("batch")
    mlp_problem, mlp_episodes = make_problem("sgd"), make_episodes(2)
    calls = []
    monkeypatch.setattr(unrolled, "mean_over_tasks", lambda *args, **kwargs: calls.append(args[3]))
    Unrolled(compile=True, compile_backend="aot_eager", threads="auto").estimate(problem, episodes)
    Unrolled(compile=True, compile_backend="aot_eager", threads=1).estimate(problem, episodes)
    Unrolled(compile=True, compile_backend="aot_eager", threads="auto").estimate(mlp_problem, mlp_episodes)
    assert calls == [2, 1, 1]
