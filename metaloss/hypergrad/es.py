"""Evolution strategies over whole inner problems: no backward pass through the inner loop.

Antithetic ES (Salimans et al. 2017) estimates the gradient of the Gaussian-smoothed outer loss
E_eps[L(phi + sigma eps)], eps ~ N(0, I):

    g = 1 / (2 N sigma) sum_{i=1..N} [L(phi + sigma eps_i) - L(phi - sigma eps_i)] eps_i,

unbiased for the smoothed objective (and for L itself when L is quadratic in phi). Each particle
runs the inner loop from scratch with perturbed phi; the inner loop may be non-differentiable.
`OnlineES` is the online regime's family (PES, ES-Single) with particles kept across truncations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.functional import tree_detach
from metaloss.hypergrad.base import HypergradEstimator, OnlineEstimator
from metaloss.online import TruncatedSystem, Truncation, check_truncation, truncation_length
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class AntitheticES(HypergradEstimator):
    """particles: antithetic pairs N; sigma: perturbation scale; seed: the noise is drawn from a
    generator seeded with (seed, call count), so a run is reproducible. batched: run the 2N
    perturbed inner problems as one batch (`torch.func.vmap` with `torch.func` inner gradients,
    at most `chunk` at a time; None: all) instead of one after another; same numbers either way.
    The reported loss is the mean of (L+ + L-) / 2, the smoothed objective's estimate.
    particle_range (set by a distributed run that splits the particles over ranks): evaluate only the
    pairs [start, stop) of the N drawn, and return their mean term (1 / (2 (stop - start) sigma)) sum
    ...; the ranks' results weighted by their pair counts sum to the estimate over all N pairs."""

    def __init__(
        self, particles: int = 8, sigma: float = 0.01, seed: int = 0, batched: bool = False, chunk: int | None = None
    ) -> None:
        if particles < 1 or sigma <= 0:
            raise ConfigError(f"ES needs particles >= 1 and sigma > 0, got {particles} and {sigma}")
        if chunk is not None and chunk < 1:
            raise ConfigError(f"chunk must be >= 1 or None, got {chunk}")
        self.particles, self.sigma, self.seed, self.calls = particles, sigma, seed, 0
        self.batched, self.chunk = batched, chunk

    @torch.no_grad()
    def _outer_loss(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> float:
        total = 0.0
        for episode in episodes:
            with torch.enable_grad():  # the inner loop takes gradients of w, never of phi
                params, inner = problem.adapt_to(episode, second_order=False, differentiable_steps=0)
            total += problem.outer_objective(params, inner, episode)[0].item() / len(episodes)
        return total

    def _losses_in_turn(self, problem: BilevelProblem, episodes: Sequence[Episode], phi: list[Tensor],
                        perturbations: list[list[Tensor]]) -> Tensor:  # fmt: skip
        """L(phi + d) for each perturbation d, one inner problem after another: [len(perturbations)]."""
        saved, losses = [p.detach().clone() for p in phi], []
        with torch.no_grad():
            for d in perturbations:
                for p, s, e in zip(phi, saved, d):
                    p.copy_(s + e)
                losses.append(self._outer_loss(problem, episodes))
            for p, s in zip(phi, saved):
                p.copy_(s)  # phi exactly as it was
        return torch.tensor(losses, dtype=torch.float64)

    def _losses_batched(self, problem: BilevelProblem, episodes: Sequence[Episode], phi: list[Tensor],
                        perturbations: list[list[Tensor]]) -> Tensor:  # fmt: skip
        """The same losses from one `vmap` over the perturbed phi."""
        from torch.func import vmap

        def outer_loss(phi_i: list[Tensor]) -> Tensor:
            perturbed = problem.with_meta_parameters(phi_i)
            total = 0.0
            for episode in episodes:
                params, inner = perturbed.adapt_to(episode, second_order=False, functional=True)
                total = total + perturbed.outer_objective(params, inner, episode)[0] / len(episodes)
            return total

        stacked = [p.detach() + torch.stack([d[j] for d in perturbations]) for j, p in enumerate(phi)]  # [2N, ...]
        with torch.no_grad():
            return vmap(outer_loss, chunk_size=self.chunk, randomness="same")(stacked).double()

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        if not episodes:
            raise ConfigError("a meta-batch needs at least one episode")
        phi = problem.meta_parameters()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        # all N pairs drawn, whatever share of them this call runs: the noise does not depend on a split
        eps = [[torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in phi]
               for _ in range(self.particles)]  # fmt: skip
        start, stop = self.particle_range or (0, self.particles)
        eps, pairs = eps[start:stop], stop - start
        perturbations = [[sign * self.sigma * e for e in pair] for sign in (1, -1) for pair in eps]  # +eps, -eps
        losses = (self._losses_batched if self.batched else self._losses_in_turn)(problem, episodes, phi, perturbations)
        plus, minus = losses[:pairs], losses[pairs:]  # [pairs], [pairs]
        grads = [torch.zeros_like(p) for p in phi]
        for i, pair in enumerate(eps):
            for g, e in zip(grads, pair):
                g.add_(float(plus[i] - minus[i]) / (2 * pairs * self.sigma) * e)
        value = float((plus + minus).mean() / 2)
        spread = float((plus - minus).abs().mean())
        return HypergradOut(grads=grads, outer_loss=value, metrics={"loss": value, "es_abs_difference": spread})

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}  # the noise of call c is drawn from (seed, c)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])


class OnlineES(OnlineEstimator):
    """Online ES with persistent particles, in the general noise-reuse form (Li et al. 2023; ES-Single,
    Vicol et al. 2023; PES, Vicol et al. 2021). `particles` states run as one batch in antithetic
    pairs (phi + sigma eps, phi - sigma eps). A pair's perturbation eps is redrawn every
    `resample_every` truncations (None: once per inner problem) and the accumulator xi sums the
    distinct perturbations the pair has used since its inner problem began. Per truncation,

        g = 1 / (particles * sigma) * sum_pairs [L(+) - L(-)] xi,

    which is unbiased for the total derivative of the truncation's loss (exactly so for quadratic
    problems). resample_every=1 is PES; resample_every=None is ES-Single; either with a
    truncation as long as the horizon is full-unroll antithetic ES. No backward pass is taken.
    truncation: K, or a schedule of lengths (see `metaloss.online.check_truncation`); the estimate
    stays unbiased whatever the lengths.
    """

    def __init__(
        self,
        particles: int = 4,
        sigma: float = 0.01,
        truncation: Truncation = 10,
        resample_every: int | None = None,
        seed: int = 0,
    ) -> None:
        if particles < 2 or particles % 2 or sigma <= 0:
            raise ConfigError("online ES needs an even particles >= 2 and sigma > 0")
        self.lengths = check_truncation(truncation)
        if resample_every is not None and resample_every < 1:
            raise ConfigError(f"resample_every must be >= 1 or None, got {resample_every}")
        self.particles, self.sigma, self.resample_every = particles, sigma, resample_every
        self.generator = torch.Generator().manual_seed(seed)
        self.state: dict | None = None
        self.eps: list[Tensor] = []
        self.xi: list[Tensor] = []
        self.count = 0  # truncations since the inner problem began

    def estimate(self, system: TruncatedSystem, phi: list[Tensor]) -> HypergradOut:
        pairs = self.particles // 2
        if self.state is None or self.state["t"] >= system.horizon:
            self.state, self.count = system.init(self.particles), 0
            self.xi = [torch.zeros(pairs, *p.shape, dtype=p.dtype, device=p.device) for p in phi]
        if self.count == 0 or (self.resample_every is not None and self.count % self.resample_every == 0):
            self.eps = [torch.randn(pairs, *p.shape, generator=self.generator, dtype=p.dtype).to(p.device) for p in phi]
            self.xi = [x + e for x, e in zip(self.xi, self.eps)]
        steps = truncation_length(self.lengths, self.count, system.horizon - self.state["t"])
        with torch.no_grad():
            perturbed = [torch.cat([p + self.sigma * e, p - self.sigma * e]) for p, e in zip(phi, self.eps)]
            self.state, loss = system.unroll(self.state, perturbed, steps)  # loss: [particles]
            difference = loss[:pairs] - loss[pairs:]  # [pairs]
            grads = [
                (difference.view(-1, *[1] * p.dim()) * x).sum(0) / (self.particles * self.sigma)
                for p, x in zip(phi, self.xi)
            ]
        self.count += 1
        value = loss.mean().item()
        return HypergradOut(grads=grads, outer_loss=value, metrics={"loss": value, "t": float(self.state["t"])})

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: the particles' inner state, the
        perturbations and accumulators, the truncation count and the noise generator."""
        return {"state": tree_detach(self.state), "eps": self.eps, "xi": self.xi, "count": self.count,
                "generator": self.generator.get_state()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.state, self.eps, self.xi, self.count = state["state"], state["eps"], state["xi"], state["count"]
        self.generator.set_state(state["generator"])
