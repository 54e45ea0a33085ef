"""EpisodeSystem: a BilevelProblem episode as a truncated system, so the online estimators apply
to the episodic algorithms. Exact answers: TBPTT over the whole horizon equals the full unroll;
full-unroll ES and PES (one step per truncation) are unbiased for it on a quadratic problem."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "hypergrad"))
from test_es import quadratic_problem  # noqa: E402
from test_unrolled import make_episodes, make_problem  # noqa: E402

from metaloss.hypergrad import OnlineES, TruncatedBackprop, Unrolled  # noqa: E402
from metaloss.online import EpisodeSystem  # noqa: E402


def test_tbptt_over_the_whole_horizon_equals_the_full_unroll() -> None:
    for objective in ("query", "inner_mean"):
        problem, (episode,) = make_problem("momentum_learned", steps=3), make_episodes(1)
        problem.meta_objective = objective
        expected = Unrolled("full").estimate(problem, [episode])
        out = TruncatedBackprop(3).estimate(EpisodeSystem(problem, episode), problem.meta_parameters())
        assert out.outer_loss == expected.outer_loss or abs(out.outer_loss - expected.outer_loss) < 1e-12
        for got, want in zip(out.grads, expected.grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_shorter_truncations_cut_the_carried_state() -> None:
    problem, (episode,) = make_problem("sgd_learned_lr", steps=3), make_episodes(1)
    system, estimator = EpisodeSystem(problem, episode), TruncatedBackprop(1)
    grads = [estimator.estimate(system, problem.meta_parameters()).grads for _ in range(3)]
    assert all(g.abs().max() > 0 for g in grads[0])  # the first truncation reaches w0 = phi
    assert all(g is None or g.abs().max() == 0 for g in grads[2][:-1])  # later ones do not reach the init
    assert grads[2][-1].abs() > 0  # but still reach the learning rate


def test_online_es_on_an_episode_is_unbiased_for_the_full_unroll() -> None:
    problem, episodes = quadratic_problem()
    exact = torch.cat([g.reshape(-1) for g in Unrolled("full").estimate(problem, episodes).grads])
    system, phi = EpisodeSystem(problem, episodes[0]), problem.meta_parameters()
    for truncation, resample_every in ((3, None), (1, 1)):  # full-unroll ES; PES read at the last truncation
        samples = []
        for seed in range(200):
            estimator = OnlineES(8, 0.5, truncation, resample_every, seed)
            for _ in range(3 // truncation):
                out = estimator.estimate(system, phi)
            samples.append(torch.cat([g.reshape(-1) for g in out.grads]))
        samples = torch.stack(samples)
        mean, se = samples.mean(0), samples.std(0) / len(samples) ** 0.5
        assert ((mean - exact).abs() < 4 * se).all(), (truncation, mean, exact, se)
        assert (4 * se < exact.abs().max()).all()


def test_episodic_online_tbptt_over_the_whole_horizon_is_the_full_unroll() -> None:
    from metaloss.hypergrad import EpisodicOnline

    for objective in ("query", "inner_mean"):
        problem, episodes = make_problem("sgd_learned_lr", steps=3), make_episodes(2)
        problem.meta_objective = objective
        expected = Unrolled("full").estimate(problem, episodes).grads
        for got, want in zip(EpisodicOnline("tbptt", truncation=3).estimate(problem, episodes).grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        # K = 1 on the trajectory objective: every step's loss, each backpropagated through one step
        short = EpisodicOnline("tbptt", truncation=1).estimate(problem, episodes).grads
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(short, expected) if a is not None)


def test_episodic_online_es_single_is_unbiased_and_reproducible() -> None:
    from metaloss.hypergrad import EpisodicOnline

    problem, episodes = quadratic_problem()
    exact = torch.cat([g.reshape(-1) for g in Unrolled("full").estimate(problem, episodes).grads])
    estimator = EpisodicOnline("es_single", truncation=1, particles=8, sigma=0.5, seed=1)
    samples = torch.stack(
        [torch.cat([g.reshape(-1) for g in estimator.estimate(problem, episodes).grads]) for _ in range(200)]
    )
    mean, se = samples.mean(0), samples.std(0) / len(samples) ** 0.5
    assert ((mean - exact).abs() < 4 * se).all()
    again = EpisodicOnline("es_single", truncation=1, particles=8, sigma=0.5, seed=1).estimate(problem, episodes)
    first = EpisodicOnline("es_single", truncation=1, particles=8, sigma=0.5, seed=1)
    assert torch.equal(first.estimate(problem, episodes).grads[0], again.grads[0])
