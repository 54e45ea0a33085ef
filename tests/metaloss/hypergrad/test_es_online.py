"""The online regime's estimators against exact answers (float64): TBPTT against a full
unroll, ES / PES / ES-Single unbiasedness on a linear-quadratic system, the variance of
ES-Single against PES over truncations, and the influence-balancing task of the PES paper."""

from __future__ import annotations

import pytest
import torch

from metaloss.errors import ConfigError
from metaloss.hypergrad import OnlineES, TruncatedBackprop
from metaloss.online import broadcast, online_meta_train
from tasks.synthetic import InfluenceBalancing, LinearQuadraticSystem

THETA = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)


def exact_truncation_gradient(system, theta: torch.Tensor, truncation: int, index: int) -> torch.Tensor:
    """d L_index / d theta through everything since the inner problem began (theta fixed throughout)."""
    theta = theta.clone().requires_grad_()
    state = system.init(1)
    for _ in range(index):
        state, loss = system.unroll(state, broadcast([theta], 1), truncation)
    return torch.autograd.grad(loss.sum(), theta)[0]


def estimates(make, system, truncations: int, repeats: int) -> torch.Tensor:
    """The estimate of truncation number `truncations` from `repeats` independently seeded estimators."""
    out = []
    for seed in range(repeats):
        estimator = make(seed)
        for _ in range(truncations):
            grads = estimator.estimate(system, [THETA]).grads
        out.append(grads[0])
    return torch.stack(out)  # [repeats, d]


@pytest.mark.parametrize(
    ("name", "truncation", "index", "resample_every"),
    [("es", 12, 1, None), ("pes", 3, 4, 1), ("es_single", 3, 4, None), ("noise_reuse_2", 3, 4, 2)],
)
def test_mean_estimate_is_within_four_standard_errors_of_the_exact_gradient(
    name: str, truncation: int, index: int, resample_every: int | None
) -> None:
    system = LinearQuadraticSystem(d=3, a=0.5, horizon=12)
    exact = exact_truncation_gradient(system, THETA, truncation, index)
    samples = estimates(lambda s: OnlineES(4, 0.1, truncation, resample_every, s), system, index, 400)
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    assert ((mean - exact).abs() < 4 * se).all(), (name, mean, exact, se)
    assert (4 * se < exact.abs().max()).all()  # informative enough to catch a wrong sign or scale


def test_es_single_variance_stays_flat_while_pes_variance_grows() -> None:
    """Total variance of the estimate of truncation t (one step each), once the gradient itself has
    settled (t = 8 vs t = 32: the exact gradients there differ by < 3%)."""
    system = LinearQuadraticSystem(d=3, a=0.5, horizon=64)
    g8, g32 = (exact_truncation_gradient(system, THETA, 1, t) for t in (8, 32))
    assert torch.allclose(g8, g32, rtol=5e-2)

    def variance(resample_every: int | None, t: int) -> float:
        return estimates(lambda s: OnlineES(2, 0.1, 1, resample_every, s), system, t, 300).var(0).sum().item()

    es_single = variance(None, 32) / variance(None, 8)
    pes = variance(1, 32) / variance(1, 8)
    assert es_single < 1.3, es_single
    assert pes > 2.5, pes  # grows about linearly with the number of accumulated perturbations


def test_truncated_backprop_over_the_whole_horizon_is_exact_and_shorter_is_not() -> None:
    system = LinearQuadraticSystem(d=3, a=0.9, horizon=6)
    theta = THETA.clone().requires_grad_()
    full = TruncatedBackprop(6).estimate(system, [theta]).grads[0]
    torch.testing.assert_close(full, exact_truncation_gradient(system, THETA, 6, 1), rtol=1e-12, atol=0)
    short = TruncatedBackprop(2)
    short.estimate(system, [theta])
    grad = short.estimate(system, [theta]).grads[0]
    # the second truncation's TBPTT gradient ignores theta's effect through the carried state
    assert (grad - exact_truncation_gradient(system, THETA, 2, 2)).abs().max() > 1e-2


def influence_balancing_run(estimator, truncations: int = 100) -> float:
    theta = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    online_meta_train(InfluenceBalancing(), estimator, [theta], torch.optim.SGD([theta], lr=1e-4), truncations)
    return theta.item()


def test_influence_balancing_tbptt_goes_the_wrong_way_es_single_the_right_way() -> None:
    """n = 23, ten entries +theta, theta0 = 0.5: the loss falls as theta falls (toward -1/6), but
    within 10 steps theta only reaches s[0] through the positive entries."""
    assert influence_balancing_run(TruncatedBackprop(10)) > 0.5
    assert influence_balancing_run(OnlineES(particles=4, sigma=0.01, truncation=10, resample_every=None)) < 0.5


def test_states_reset_with_the_inner_problem() -> None:
    system, estimator = LinearQuadraticSystem(horizon=4), OnlineES(2, 0.1, 3, None, 0)
    assert [estimator.estimate(system, [THETA]).metrics["t"] for _ in range(4)] == [3.0, 4.0, 3.0, 4.0]


def test_bad_settings_are_rejected() -> None:
    for make in (lambda: OnlineES(particles=3), lambda: OnlineES(resample_every=0), lambda: TruncatedBackprop(0)):
        with pytest.raises(ConfigError):
            make()


def exact_scheduled_gradient(system, theta: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """d L / d theta of the last of the truncations with these lengths, through all of them."""
    theta = theta.clone().requires_grad_()
    state = system.init(1)
    for k in lengths:
        state, loss = system.unroll(state, broadcast([theta], 1), k)
    return torch.autograd.grad(loss.sum(), theta)[0]


@pytest.mark.parametrize("resample_every", [1, None], ids=["pes", "es_single"])
def test_a_truncation_schedule_keeps_pes_and_es_single_unbiased(resample_every: int | None) -> None:
    """Lengths [1, 2, 4] (then 4 again): the fourth truncation covers steps 7..10 of 12."""
    system = LinearQuadraticSystem(d=3, a=0.5, horizon=12)
    exact = exact_scheduled_gradient(system, THETA, [1, 2, 4, 4])
    samples = estimates(lambda s: OnlineES(4, 0.1, [1, 2, 4], resample_every, s), system, 4, 400)
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    assert (4 * se < exact.abs().max()).all()


def test_truncation_schedule_lengths_and_the_reset_at_the_horizon() -> None:
    system = LinearQuadraticSystem(d=3, a=0.9, horizon=10)
    tbptt, es = TruncatedBackprop([1, 2, 4]), OnlineES(2, 0.1, [1, 2, 4], None, 0)
    # 1, 2, 4, then the last length repeats and is cut at the horizon (3 left); then a new problem
    expected = [1.0, 3.0, 7.0, 10.0, 1.0, 3.0]
    assert [tbptt.estimate(system, [THETA.clone().requires_grad_()]).metrics["t"] for _ in range(6)] == expected
    assert [es.estimate(system, [THETA]).metrics["t"] for _ in range(6)] == expected
    # a schedule that covers the horizon in one truncation is the exact full-horizon gradient
    theta = THETA.clone().requires_grad_()
    torch.testing.assert_close(TruncatedBackprop([10]).estimate(system, [theta]).grads[0],
                               exact_scheduled_gradient(system, THETA, [10]), rtol=1e-12, atol=0)  # fmt: skip


@pytest.mark.parametrize("bad", [0, [], [2, 0], [1.5], True, "4"])
def test_bad_truncation_schedules_are_rejected(bad) -> None:
    with pytest.raises(ConfigError, match="truncation"):
        OnlineES(2, 0.1, bad)
    with pytest.raises(ConfigError, match="truncation"):
        TruncatedBackprop(bad)


@pytest.mark.parametrize(
    "make",
    [lambda: OnlineES(4, 0.1, [1, 2], resample_every=1, seed=3), lambda: OnlineES(4, 0.1, 2, None, seed=3),
     lambda: TruncatedBackprop([1, 2])],
    ids=["pes", "es_single", "tbptt"],
)  # fmt: skip
def test_a_resumed_estimator_continues_exactly(make) -> None:
    """Checkpoint after 3 truncations (through torch.save, as a run would), resume in a fresh
    estimator: the next 5 estimates, across a horizon reset, equal the uninterrupted run's."""
    import io

    system = LinearQuadraticSystem(d=3, a=0.5, horizon=6)
    theta = THETA.clone().requires_grad_()
    straight = make()
    for _ in range(3):
        straight.estimate(system, [theta])
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    expected = [straight.estimate(system, [theta]).grads[0] for _ in range(5)]
    resumed = make()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for want in expected:
        assert torch.equal(resumed.estimate(system, [theta]).grads[0], want)
