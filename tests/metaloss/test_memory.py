"""`tensor_peak_growth` on allocations of known sizes, and the task loop's tensor peak against a
hand-written MAML loop's (the per-task memory target of benchmarks/peers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metaloss.engine import meta_step
from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad import Implicit, Unrolled
from metaloss.hypergrad.base import mean_over_tasks
from metaloss.losses import cross_entropy
from metaloss.memory import tensor_peak_growth
from metaloss.meta import HyperparameterOptimizer, LearnedInit, Proximal
from metaloss.models import Conv4
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

MB = 1000 * 1000 * 4  # bytes of a float32 tensor of 10^6 elements


def test_the_peak_counts_what_is_live_at_once_from_where_the_measured_work_began() -> None:
    kept = []

    def measured() -> None:
        a = torch.empty(1000 * 1000)
        b = torch.empty(2 * 1000 * 1000)  # a and b live together: 3 MB of floats
        del a, b
        kept.append(torch.empty(1000 * 1000))  # outlives the call; the peak stays 3

    assert tensor_peak_growth(lambda: None, measured) == 3 * MB


def test_blocks_freed_in_the_measured_work_count_down_when_they_were_allocated_before_it() -> None:
    held = {}

    def before() -> None:
        held["x"] = torch.empty(2 * 1000 * 1000)

    def measured() -> None:
        del held["x"]  # 2 MB freed, then 1 MB allocated: no growth over the start
        held["y"] = torch.empty(1000 * 1000)

    assert tensor_peak_growth(before, measured) == 0


def small_maml() -> tuple[torch.nn.Module, list[Episode]]:
    torch.manual_seed(0)
    model = apply_batchnorm_policy(Conv4(n_classes=3, filters=8, image_size=16, pool="max"), "transductive")
    g = torch.Generator().manual_seed(1)
    y, yq = torch.arange(3), torch.arange(3).repeat_interleave(4)
    episodes = [Episode(torch.rand(3, 1, 16, 16, generator=g), y, torch.rand(12, 1, 16, 16, generator=g), yq)
                for _ in range(4)]  # fmt: skip
    return model, episodes


def test_the_task_loops_tensor_peak_is_no_higher_than_a_hand_written_maml_loops() -> None:
    """Per task, summing into .grad (`summed_in_grad`) holds one gradient buffer, as `backward()` in
    a hand-written loop does, and the engine drops the last step's gradient before the next."""
    torch.set_num_threads(1)
    lr, steps = 0.4, 2
    model, episodes = small_maml()
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=lr), cross_entropy,
                             cross_entropy, steps)  # fmt: skip
    estimator, outer = Unrolled("full"), torch.optim.Adam(problem.meta_parameters(), lr=1e-3)

    def ours() -> None:
        meta_step(problem, estimator, outer, episodes)

    reference_model, _ = small_maml()
    reference_outer = torch.optim.Adam(reference_model.parameters(), lr=1e-3)

    def hand_written() -> None:
        reference_outer.zero_grad(set_to_none=True)
        for e in episodes:
            fast = dict(reference_model.named_parameters())
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(reference_model, fast, (e.support_x,)), e.support_y)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads)}
            query = F.cross_entropy(functional_call(reference_model, fast, (e.query_x,)), e.query_y)
            (query / len(episodes)).backward()
        reference_outer.step()

    for step in (ours, hand_written):  # the outer optimisers' state, allocated once
        step()
    theirs = tensor_peak_growth(hand_written, hand_written)
    mine = tensor_peak_growth(ours, ours)
    assert theirs > 0
    assert mine <= theirs, (mine, theirs)
    for p, q in zip(problem.meta_parameters(), reference_model.parameters()):  # the same steps were taken
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_implicit_tasks_summed_in_grad_hold_one_gradient_copy_less_than_returned_ones() -> None:
    """iMAML's task loop: d - m in d's buffer and the sum in phi's .grad (`add_into_grad`) against
    returned task gradients summed beside a running sum (one parameter copy more at the peak)."""
    torch.set_num_threads(1)
    model, episodes = small_maml()
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.4), cross_entropy,
                             cross_entropy, 2, inner_regularizer=Proximal(1.0))  # fmt: skip
    phi, estimator = problem.meta_parameters(), Implicit("cg", iterations=3)
    copy_bytes = sum(p.numel() * p.element_size() for p in phi)

    def summed() -> None:
        for p in phi:
            p.grad = None
        mean_over_tasks(problem, episodes, estimator._task, accumulates=True)

    def returned() -> None:
        mean_over_tasks(problem, episodes, estimator._task, accumulates=False)

    in_grad, beside = tensor_peak_growth(summed, summed), tensor_peak_growth(returned, returned)
    assert beside - in_grad >= copy_bytes, (in_grad, beside, copy_bytes)  # measured: exactly one copy less
