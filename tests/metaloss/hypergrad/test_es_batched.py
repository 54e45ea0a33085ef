"""Particles as one batch: `AntitheticES(batched=True)` and `EpisodeSystem(batched=True)` run the
perturbed inner problems in one `torch.func.vmap` with `torch.func` inner gradients. They must give
the numbers of the one-at-a-time loop (autograd inner gradients), for every inner optimizer,
both meta-objectives, minibatched inner steps, and a Conv-4 with transductive BatchNorm."""

from __future__ import annotations

import pytest
import torch
from test_unrolled import make_episodes, make_problem

from metaloss.errors import ConfigError
from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad import AntitheticES, EpisodicOnline, OnlineES
from metaloss.losses import accuracy, cross_entropy
from metaloss.meta import HyperparameterOptimizer, LearnedInit
from metaloss.models import Conv4
from metaloss.online import EpisodeSystem
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

KINDS = ["sgd", "sgd_learned_lr", "momentum_learned", "adam_learned", "metasgd"]


def conv4_problem(norm: str = "batch") -> tuple[BilevelProblem, list[Episode]]:
    """3-way 1-shot on 12x12 single-channel images, Conv-4 with 3 filters and BatchNorm affine
    parameters in phi (the case where a vmap over tasks went wrong, see DESIGN.md); norm
    "batch_per_step": MAML++'s per-step pairs, 3 of them for the 2 inner steps and the query."""
    torch.manual_seed(0)
    model = Conv4(n_classes=3, filters=3, image_size=12, norm=norm, norm_steps=3)
    model = apply_batchnorm_policy(model.double(), "transductive")
    if norm == "batch_per_step":
        with torch.no_grad():  # distinct pairs, so that a wrong step shows
            for name, p in model.named_parameters():
                if p.dim() == 2 and name.startswith("features"):
                    p.add_(0.3 * torch.randn_like(p))
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.2, learn=["lr"]),
                             cross_entropy, cross_entropy, 2, metric=accuracy)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    episodes = [Episode(torch.randn(3, 1, 12, 12, generator=g, dtype=torch.float64), torch.arange(3),
                        torch.randn(6, 1, 12, 12, generator=g, dtype=torch.float64), torch.arange(3).repeat(2))
                for _ in range(2)]  # fmt: skip
    return problem, episodes


def assert_same(a, b) -> None:
    assert a.outer_loss == pytest.approx(b.outer_loss, rel=1e-10)
    for x, y in zip(a.grads, b.grads):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["query", "inner_mean"])
@pytest.mark.parametrize("kind", KINDS)
def test_antithetic_es_batched_equals_the_loop(kind: str, objective: str) -> None:
    problem, episodes = make_problem(kind, steps=3), make_episodes(2)
    problem.meta_objective = objective
    loop = AntitheticES(particles=3, sigma=0.01, seed=5).estimate(problem, episodes)
    batched = AntitheticES(particles=3, sigma=0.01, seed=5, batched=True).estimate(problem, episodes)
    assert_same(batched, loop)
    assert any(g.abs().max() > 0 for g in loop.grads)


def test_antithetic_es_batched_equals_the_loop_on_conv4_with_batchnorm_and_in_chunks() -> None:
    problem, episodes = conv4_problem()
    before = [p.detach().clone() for p in problem.meta_parameters()]
    loop = AntitheticES(particles=2, sigma=0.01, seed=1).estimate(problem, episodes)
    for chunk in (None, 3):
        batched = AntitheticES(particles=2, sigma=0.01, seed=1, batched=True, chunk=chunk)
        assert_same(batched.estimate(problem, episodes), loop)
    assert all(torch.equal(p, b) for p, b in zip(problem.meta_parameters(), before))  # phi untouched


def test_antithetic_es_batched_with_minibatched_inner_steps() -> None:
    problem, episodes = make_problem("sgd_learned_lr", steps=4), make_episodes(1)
    problem.inner_batch_size = 4  # 6 support rows: step t sees rows [4t, 4t + 4) mod 6
    assert_same(AntitheticES(2, 0.01, seed=2, batched=True).estimate(problem, episodes),
                AntitheticES(2, 0.01, seed=2).estimate(problem, episodes))  # fmt: skip


@pytest.mark.parametrize("objective", ["query", "inner_mean"])
@pytest.mark.parametrize("kind", ["sgd_learned_lr", "momentum_learned", "adam_learned", "metasgd"])
def test_episode_system_batched_carries_the_same_states_as_the_loop(kind: str, objective: str) -> None:
    """PES over four truncations of one step (perturbations redrawn each time, Adam's step count and
    momentum buffers carried across truncations): the batched system gives the loop's estimates."""
    problem, (episode,) = make_problem(kind, steps=4), make_episodes(1)
    problem.meta_objective = objective
    phi = problem.meta_parameters()
    runs = []
    for batched in (False, True):
        estimator, system = OnlineES(6, 0.01, 1, resample_every=1, seed=3), EpisodeSystem(problem, episode, batched)
        runs.append([estimator.estimate(system, phi) for _ in range(4)])
    for loop, batched in zip(*runs):
        assert_same(batched, loop)


def test_episodic_online_batched_equals_the_loop_on_conv4() -> None:
    problem, episodes = conv4_problem()
    for update in ("horizon", "truncation"):
        outs = []
        for batched in (False, True):
            estimator = EpisodicOnline("es_single", truncation=1, particles=4, sigma=0.01, seed=0, update=update,
                                       batched=batched)  # fmt: skip
            outs.append(list(estimator.updates(problem, episodes)))  # phi is not stepped in between here
        for loop, batched in zip(*outs):
            assert_same(batched, loop)


def test_batched_tbptt_is_refused() -> None:
    with pytest.raises(ConfigError, match="ES kinds"):
        EpisodicOnline("tbptt", batched=True)
    with pytest.raises(ConfigError, match="chunk"):
        AntitheticES(chunk=0)


def test_batched_es_works_where_the_inner_loop_is_not_differentiable() -> None:
    """The quantised-step inner optimizer of test_es.py: autograd gives zero for its learning rate;
    the batched ES estimate equals the loop's and is not zero."""
    from test_es import QuantizedSGD, quadratic_problem

    problem, episodes = quadratic_problem()
    problem.init.requires_grad_(False)
    problem.inner_opt = QuantizedSGD()
    loop = AntitheticES(particles=8, sigma=0.05, seed=0).estimate(problem, episodes)
    batched = AntitheticES(particles=8, sigma=0.05, seed=0, batched=True).estimate(problem, episodes)
    assert_same(batched, loop)
    assert loop.grads[0].abs().item() > 0


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
def test_episode_system_particles_survive_a_checkpoint(batched: bool) -> None:
    """PES on an episode with Adam's state carried: save after two truncations (torch.save), resume
    in a fresh estimator, and the remaining truncations give the uninterrupted run's estimates."""
    import io

    problem, (episode,) = make_problem("adam_learned", steps=4), make_episodes(1)
    phi, system = problem.meta_parameters(), EpisodeSystem(problem, episode, batched)
    straight = OnlineES(4, 0.01, 1, resample_every=1, seed=7)
    for _ in range(2):
        straight.estimate(system, phi)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    expected = [straight.estimate(system, phi) for _ in range(2)]
    resumed = OnlineES(4, 0.01, 1, resample_every=1, seed=0)  # another seed: the state brings the noise
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for want in expected:
        got = resumed.estimate(system, phi)
        assert all(torch.equal(a, b) for a, b in zip(got.grads, want.grads))
