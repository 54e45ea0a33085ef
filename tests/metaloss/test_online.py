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
from metaloss.online import EpisodeSystem, online_meta_train  # noqa: E402


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


def test_episodic_online_per_truncation_updates_equal_a_hand_written_online_tbptt() -> None:
    """update="truncation", TBPTT with K = 1, query objective, T = 3, plain SGD on phi: after each
    inner step, phi (init and lr) descends the query loss after that step, backpropagated through
    that step alone from the carried (detached) weights; the inner problem goes on with the new phi."""
    from metaloss.engine import meta_step
    from metaloss.hypergrad import EpisodicOnline

    problem, (episode,) = make_problem("sgd_learned_lr", steps=3), make_episodes(1)
    out = meta_step(problem, EpisodicOnline("tbptt", truncation=1, update="truncation"),
                    torch.optim.SGD(problem.meta_parameters(), lr=0.05), [episode])  # fmt: skip
    assert out.metrics["outer_updates"] == 3.0

    reference = make_problem("sgd_learned_lr", steps=3)  # the same phi as `problem` had
    *init, lr = reference.meta_parameters()
    w = None
    for t in range(3):
        start, _ = reference.initial_params()  # w0 with its graph to the init, at step 0 only
        w = start if w is None else {n: p.detach().requires_grad_() for n, p in w.items()}
        support = reference.inner_loss(reference.predict(w, episode.support_x), episode.support_y)
        grads = torch.autograd.grad(support, list(w.values()), create_graph=True)
        w = {n: p - lr * g for (n, p), g in zip(w.items(), grads)}  # one SGD step
        query = reference.outer_loss(reference.predict(w, episode.query_x), episode.query_y)
        wanted = init + [lr] if t == 0 else [lr]  # later truncations do not reach the init
        with torch.no_grad():
            for p, g in zip(wanted, torch.autograd.grad(query, wanted)):
                p -= 0.05 * g
    for got, want in zip(problem.meta_parameters(), reference.meta_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_episodic_online_per_truncation_averages_the_meta_batch_in_lockstep() -> None:
    """Two episodes: every update is the mean of the two systems' truncation estimates, each system
    carried on with the updated phi (compared with the systems driven by hand)."""
    from metaloss.engine import meta_step
    from metaloss.hypergrad import EpisodicOnline

    for objective in ("query", "inner_mean"):
        problem, episodes = make_problem("momentum_learned", steps=4), make_episodes(2)
        problem.meta_objective = objective
        estimator = EpisodicOnline("tbptt", truncation=2, update="truncation")
        assert meta_step(problem, estimator, torch.optim.SGD(problem.meta_parameters(), lr=0.05),
                         episodes).metrics["outer_updates"] == 2.0  # fmt: skip

        reference = make_problem("momentum_learned", steps=4)
        reference.meta_objective = objective
        phi = reference.meta_parameters()
        runs = [(EpisodeSystem(reference, e), TruncatedBackprop(2)) for e in episodes]
        for _ in range(2):
            outs = [estimator.estimate(system, phi).grads for system, estimator in runs]
            with torch.no_grad():
                for i, p in enumerate(phi):
                    parts = [o[i] for o in outs if o[i] is not None]
                    if parts:
                        p -= 0.05 * sum(parts) / 2
        for got, want in zip(problem.meta_parameters(), phi):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_episodic_online_per_truncation_es_single_learns_and_refuses_estimate() -> None:
    """ES-Single with per-truncation updates lowers the meta-objective on the quadratic problem,
    and `estimate` (one gradient per meta-step) is refused with a clear error in that mode."""
    import pytest

    from metaloss.engine import meta_step
    from metaloss.errors import ConfigError
    from metaloss.hypergrad import EpisodicOnline

    problem, episodes = quadratic_problem()
    estimator = EpisodicOnline("es_single", truncation=1, particles=8, sigma=0.1, seed=0, update="truncation")
    before = Unrolled("full").estimate(problem, episodes).outer_loss
    outer = torch.optim.SGD(problem.meta_parameters(), lr=0.02)
    for _ in range(20):
        meta_step(problem, estimator, outer, episodes)
    assert Unrolled("full").estimate(problem, episodes).outer_loss < 0.5 * before
    with pytest.raises(ConfigError, match="updates"):
        estimator.estimate(problem, episodes)
    with pytest.raises(ConfigError, match="update interval"):
        EpisodicOnline("pes", update="sometimes")


def test_episodic_online_follows_a_truncation_schedule() -> None:
    """Lengths [1, 2] over T = 3: two updates per meta-step in the online mode; in the horizon mode
    the trajectory objective weights the truncations 1/3 and 2/3, which for TBPTT is the weighted
    sum of the two truncations' own gradients (checked against the systems driven by hand)."""
    from metaloss.engine import meta_step
    from metaloss.hypergrad import EpisodicOnline

    problem, (episode,) = make_problem("sgd_learned_lr", steps=3), make_episodes(1)
    out = meta_step(problem, EpisodicOnline("tbptt", truncation=[1, 2], update="truncation"),
                    torch.optim.SGD(problem.meta_parameters(), lr=0.01), [episode])  # fmt: skip
    assert out.metrics["outer_updates"] == 2.0

    problem = make_problem("sgd_learned_lr", steps=3)
    problem.meta_objective = "inner_mean"
    got = EpisodicOnline("tbptt", truncation=[1, 2]).estimate(problem, [episode]).grads
    system, tbptt = EpisodeSystem(problem, episode), TruncatedBackprop([1, 2])
    first, second = (tbptt.estimate(system, problem.meta_parameters()).grads for _ in range(2))
    for g, a, b in zip(got, first, second):  # None: a truncation's loss does not reach that parameter
        # (the first truncation's loss is L_in(w_0): it reaches the init, not the learning rate)
        want = sum(w * x for w, x in ((1 / 3, a), (2 / 3, b)) if x is not None)
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14)


def test_an_update_interval_of_two_truncations_averages_their_estimates() -> None:
    """update=2 over four one-step truncations: two updates, each from the mean of two consecutive
    truncation estimates taken at the same phi (compared with the systems driven by hand)."""
    from metaloss.engine import meta_step
    from metaloss.hypergrad import EpisodicOnline

    problem, episodes = make_problem("momentum_learned", steps=4), make_episodes(2)
    problem.meta_objective = "inner_mean"
    out = meta_step(problem, EpisodicOnline("tbptt", truncation=1, update=2),
                    torch.optim.SGD(problem.meta_parameters(), lr=0.05), episodes)  # fmt: skip
    assert out.metrics["outer_updates"] == 2.0

    reference = make_problem("momentum_learned", steps=4)
    reference.meta_objective = "inner_mean"
    phi = reference.meta_parameters()
    runs = [(EpisodeSystem(reference, e), TruncatedBackprop(1)) for e in episodes]
    for _ in range(2):
        outs = [estimator.estimate(system, phi).grads for _ in range(2) for system, estimator in runs]
        with torch.no_grad():
            for i, p in enumerate(phi):
                parts = [o[i] for o in outs if o[i] is not None]
                if parts:
                    p -= 0.05 * sum(parts) / 4  # two episodes x two truncations
    for got, want in zip(problem.meta_parameters(), phi):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_online_meta_train_update_interval() -> None:
    """update_every=3 over 7 truncations: steps after truncations 3, 6 and 7, each with the mean of
    its estimates (the first checked against the same estimates at the unchanged theta)."""
    import pytest

    from metaloss.errors import ConfigError
    from tasks.synthetic import LinearQuadraticSystem

    system = LinearQuadraticSystem(d=3, a=0.5, horizon=100)
    theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    outer = torch.optim.SGD([theta], lr=0.1)
    applied, step = [], outer.step
    outer.step = lambda: (applied.append(theta.grad.clone()), step())[1]
    history = online_meta_train(system, TruncatedBackprop(1), [theta], outer, 7, update_every=3)
    assert len(history) == 7 and len(applied) == 3
    reference, fixed = TruncatedBackprop(1), [torch.zeros(3, dtype=torch.float64).requires_grad_()]
    first = [reference.estimate(system, fixed).grads[0] for _ in range(3)]
    torch.testing.assert_close(applied[0], sum(first) / 3, rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="update_every"):
        online_meta_train(system, TruncatedBackprop(1), [theta], outer, 2, update_every=0)
