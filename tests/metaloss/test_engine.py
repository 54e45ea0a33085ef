"""The engine: outer steps, meta-test statistics, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from metaloss.baselines import train_jointly
from metaloss.checkpoint import load_checkpoint, save_checkpoint
from metaloss.engine import MetaTrainer, evaluate, mean_ci95, meta_step, meta_train
from metaloss.errors import ConfigError
from metaloss.hypergrad import Unrolled
from metaloss.losses import mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit
from metaloss.models import MLP
from metaloss.problem import BilevelProblem
from tasks import SinusoidSampler, sample_episodes


def sinusoid_problem(seed: int = 0, hidden=(16, 16)) -> BilevelProblem:
    torch.manual_seed(seed)
    model = MLP(1, hidden, 1)
    return BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer(lr=0.01), mse, mse, 1)


def test_meta_step_applies_the_estimated_gradient() -> None:
    problem = sinusoid_problem()
    episodes = sample_episodes(SinusoidSampler(), 0, 4)
    before = [p.detach().clone() for p in problem.meta_parameters()]
    expected = Unrolled().estimate(problem, episodes).grads
    outer = torch.optim.SGD(problem.meta_parameters(), lr=0.1)
    meta_step(problem, Unrolled(), outer, episodes)
    for p, b, g in zip(problem.meta_parameters(), before, expected):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


def test_mean_ci95() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    mean, half = mean_ci95(values)
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in values) / 3)
    assert mean == pytest.approx(2.5) and half == pytest.approx(1.96 * sd / 2)


def test_evaluate_is_deterministic_and_reports_each_step() -> None:
    problem = sinusoid_problem()
    first = evaluate(problem, SinusoidSampler(seed=3, split="test"), 20, steps=(0, 2))
    second = evaluate(problem, SinusoidSampler(seed=3, split="test"), 20, steps=(0, 2))
    assert first == second
    assert set(first) == {"loss_step0", "loss_step0_ci95", "loss_step2", "loss_step2_ci95"}
    assert first["loss_step2"] < first["loss_step0"]  # two SGD steps on the support set help on the query set


@pytest.mark.parametrize("batch_tasks", [2, 7, 64])
def test_evaluate_with_tasks_batched_gives_the_numbers_of_the_loop(batch_tasks: int) -> None:
    """vmap batches of tasks (a ragged last batch with 7 of 20) against one task at a time, float64,
    Adam inner steps (a state carried between steps)."""
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("adam", lr=0.05), mse, mse, 1)
    sampler = SinusoidSampler(seed=3, split="test")
    loop = evaluate(problem, sampler, 20, steps=(0, 1, 3), dtype=torch.float64)
    batched = evaluate(problem, sampler, 20, steps=(0, 1, 3), dtype=torch.float64, batch_tasks=batch_tasks)
    assert batched.keys() == loop.keys()
    for k in loop:
        assert batched[k] == pytest.approx(loop[k], rel=1e-12, abs=1e-14), k
    assert loop["loss_step3"] < loop["loss_step0"]


@pytest.mark.parametrize("threads", [2, 3])
def test_evaluate_with_tasks_in_threads_gives_the_numbers_of_the_loop_bit_for_bit(threads: int) -> None:
    """Tasks adapted side by side on CPU threads (rounds of 16 and 24 of 20 tasks: a ragged last
    round) against one at a time at one intra-op thread, as each worker runs."""
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1)
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("adam", lr=0.05), mse, mse, 1)
    sampler = SinusoidSampler(seed=3, split="test")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loop = evaluate(problem, sampler, 20, steps=(0, 1, 3))
    finally:
        torch.set_num_threads(before)
    assert evaluate(problem, sampler, 20, steps=(0, 1, 3), threads=threads) == loop
    assert loop["loss_step3"] < loop["loss_step0"]


def test_evaluate_auto_batches_what_vmap_takes_and_falls_back_to_the_loop_where_it_does_not() -> None:
    """batch_tasks="auto": 32 tasks at once for an MLP (the same numbers as the loop, float64, 40 tasks:
    a ragged last batch; each episode drawn once, the probe's episodes being the first batch); a loss
    with data-dependent control flow is refused by vmap, so auto warns and adapts one task at a time,
    again with the loop's numbers; an explicit batch size raises."""

    class CountingSampler(SinusoidSampler):
        def episode(self, index: int):
            drawn.append(index)
            return super().episode(index)

    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.05), mse, mse, 1)
    sampler, drawn = CountingSampler(seed=3, split="test"), []
    loop = evaluate(problem, sampler, 40, steps=(0, 2), dtype=torch.float64)
    drawn.clear()
    auto = evaluate(problem, sampler, 40, steps=(0, 2), dtype=torch.float64, batch_tasks="auto")
    assert drawn == list(range(40))
    for k in loop:
        assert auto[k] == pytest.approx(loop[k], rel=1e-12, abs=1e-14), k

    def branching_mse(prediction, target):
        return mse(prediction, target) * (2.0 if bool(target.sum() > 0) else 1.0)

    problem.inner_loss = branching_mse
    loop = evaluate(problem, sampler, 40, steps=(0, 2), dtype=torch.float64)
    with pytest.warns(UserWarning, match="vmap refused"):
        auto = evaluate(problem, sampler, 40, steps=(0, 2), dtype=torch.float64, batch_tasks="auto")
    assert auto == loop
    with pytest.raises(RuntimeError, match="vmap"):
        evaluate(problem, sampler, 40, steps=(0, 2), dtype=torch.float64, batch_tasks=8)
    with pytest.raises(ConfigError, match="batch_tasks"):
        evaluate(problem, sampler, 40, steps=(0, 2), batch_tasks="sometimes")


def test_checkpoint_round_trip(tmp_path) -> None:
    problem = sinusoid_problem()
    outer = torch.optim.Adam(problem.meta_parameters(), lr=1e-3)
    trainer = MetaTrainer(problem, Unrolled(), outer, SinusoidSampler(), meta_batch=2)
    trainer.train(2, progress=False)
    path = save_checkpoint(tmp_path / "ckpt.pt", trainer.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    restored = sinusoid_problem(seed=1)
    restored_outer = torch.optim.Adam(restored.meta_parameters(), lr=1e-3)
    state = load_checkpoint(path, restored, restored_outer)
    assert state["run"]["step"] == 2 and state["version"] == 2
    for a, b in zip(problem.meta_parameters(), restored.meta_parameters()):
        assert torch.equal(a, b)
    assert restored_outer.state_dict()["state"][0]["step"] == 2


def test_maml_still_learns_sinusoid() -> None:
    """A short MAML run beats both the zero predictor (MSE 4.25) and the pretrained baseline
    after 10 adaptation steps on held-out tasks."""
    torch.manual_seed(0)
    problem = sinusoid_problem(hidden=(40, 40))
    outer = torch.optim.Adam(problem.meta_parameters(), lr=3e-3)
    meta_train(problem, Unrolled(), outer, SinusoidSampler(seed=0), meta_steps=300, meta_batch=10, progress=False)
    maml = evaluate(problem, SinusoidSampler(seed=0, split="test"), 200, steps=(10,))
    baseline = sinusoid_problem(seed=1, hidden=(40, 40))
    train_jointly(baseline.model, SinusoidSampler(seed=0), mse, steps=300, tasks_per_step=10, lr=3e-3)
    pretrained = evaluate(baseline, SinusoidSampler(seed=0, split="test"), 200, steps=(10,))
    assert maml["loss_step10"] < 0.5 * 4.25
    assert maml["loss_step10"] + maml["loss_step10_ci95"] < pretrained["loss_step10"] - pretrained["loss_step10_ci95"]
