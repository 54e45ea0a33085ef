"""Parity of the MAML meta-gradient (``Unrolled("full")``) with the one `higher` computes.

Setting: Conv-4 (32 filters, 28x28x1), 5-way 1-shot episodes, transductive BatchNorm
(``track_running_stats=False``: every forward pass uses its own batch statistics), fixed inner
SGD, float64. The reference is the textbook `higher` MAML loop: one ``innerloop_ctx`` per task
over the very same ``nn.Module`` (``copy_initial_weights=False``), ``diffopt.step`` on the
support loss, the query loss divided by the meta-batch size, ``backward`` accumulating into
``model.parameters()``'s ``.grad``.
"""

from __future__ import annotations

import higher
import pytest
import torch
from torch import Tensor, nn

from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad.unrolled import Unrolled
from metaloss.losses import cross_entropy
from metaloss.meta.init import LearnedInit
from metaloss.meta.optimizer import HyperparameterOptimizer
from metaloss.models import Conv4
from metaloss.problem import BilevelProblem
from metaloss.types import Episode
from tasks.few_shot import FewShotSampler

DTYPE = torch.float64
INNER_LR = 0.4
N_WAY, K_SHOT = 5, 1
RTOL = 1e-6
# Conv biases feed straight into a batch-normalising BatchNorm, so their true meta-gradient is
# exactly zero and both implementations return round-off (~1e-14); an absolute floor far below
# the gradient's scale (~1e-1 .. 1e1 here) keeps those tensors from failing a purely relative test.
ATOL = 1e-10


def _episodes(meta_batch: int, q_query: int, seed: int) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)
    n_classes, per_class = 8, K_SHOT + q_query + 2
    images = torch.rand(n_classes * per_class, 1, 28, 28, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    sampler = FewShotSampler(images, labels, range(n_classes), n_way=N_WAY, k_shot=K_SHOT, q_query=q_query, seed=seed)
    return [sampler.episode(i).to(dtype=DTYPE) for i in range(meta_batch)]


def _model(pool: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Conv4(n_classes=N_WAY, in_channels=1, filters=32, image_size=28, pool=pool).to(DTYPE)
    return apply_batchnorm_policy(model, "transductive")


def _ours(model: nn.Module, episodes: list[Episode], steps: int) -> tuple[list[Tensor], float]:
    problem = BilevelProblem(
        model,
        LearnedInit(model),
        HyperparameterOptimizer("sgd", lr=INNER_LR),
        cross_entropy,
        cross_entropy,
        inner_steps=steps,
    )
    phi = problem.meta_parameters()
    assert [id(p) for p in phi] == [id(p) for p in model.parameters()]
    out = Unrolled("full").estimate(problem, episodes)
    assert all(g is not None for g in out.grads)
    return [g.detach() for g in out.grads], out.outer_loss


def _higher(model: nn.Module, episodes: list[Episode], steps: int) -> tuple[list[Tensor], float]:
    model.zero_grad(set_to_none=True)
    inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    total = 0.0
    for ep in episodes:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, track_higher_grads=True) as (
            fmodel,
            diffopt,
        ):
            for _ in range(steps):
                diffopt.step(cross_entropy(fmodel(ep.support_x), ep.support_y))
            loss = cross_entropy(fmodel(ep.query_x), ep.query_y)
            (loss / len(episodes)).backward()
            total += loss.item()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads, total / len(episodes)


def _relative_error(a: list[Tensor], b: list[Tensor]) -> float:
    flat_a = torch.cat([t.flatten() for t in a])
    flat_b = torch.cat([t.flatten() for t in b])
    return ((flat_a - flat_b).norm() / flat_b.norm()).item()


def _assert_parity(model: nn.Module, ours: list[Tensor], ref: list[Tensor]) -> None:
    assert len(ours) == len(ref)
    for (name, _), g, r in zip(model.named_parameters(), ours, ref):
        assert g.dtype == DTYPE and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    assert _relative_error(ours, ref) < RTOL


@pytest.mark.parametrize(
    ("pool", "steps", "meta_batch", "q_query"),
    [
        ("max", 1, 3, 2),
        ("stride", 1, 3, 2),
        ("max", 2, 2, 1),
        ("stride", 2, 2, 1),
    ],
)
def test_maml_meta_gradient_matches_higher(pool: str, steps: int, meta_batch: int, q_query: int) -> None:
    model = _model(pool, seed=steps)
    episodes = _episodes(meta_batch, q_query, seed=10 + steps)
    before = [p.detach().clone() for p in model.parameters()]

    ours, our_loss = _ours(model, episodes, steps)
    ref, ref_loss = _higher(model, episodes, steps)

    # neither computation moved the meta-parameters (the comparison is at one and the same phi)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert our_loss == pytest.approx(ref_loss, rel=1e-12)
    assert torch.cat([r.flatten() for r in ref]).norm() > 1e-3  # a non-trivial gradient
    _assert_parity(model, ours, ref)


def test_comparison_sees_second_order_terms() -> None:
    """The first-order (FOMAML) gradient is far from higher's second-order one at this tolerance,
    so the parity above genuinely checks the Hessian-vector terms through the inner step."""
    model = _model("max", seed=1)
    episodes = _episodes(meta_batch=2, q_query=1, seed=11)
    problem = BilevelProblem(
        model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=INNER_LR), cross_entropy, cross_entropy, 1
    )
    first_order = [g.detach() for g in Unrolled("first_order").estimate(problem, episodes).grads]
    ref, _ = _higher(model, episodes, steps=1)
    assert _relative_error(first_order, ref) > 1e3 * RTOL
