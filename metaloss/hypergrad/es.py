"""Evolution strategies over whole inner problems: no backward pass through the inner loop.

Antithetic ES (Salimans et al. 2017) estimates the gradient of the Gaussian-smoothed outer loss
E_eps[L(phi + sigma eps)], eps ~ N(0, I):

    g = 1 / (2 N sigma) sum_{i=1..N} [L(phi + sigma eps_i) - L(phi - sigma eps_i)] eps_i,

unbiased for the smoothed objective (and for L itself when L is quadratic in phi). Each particle
runs the inner loop from scratch with perturbed phi; the inner loop may be non-differentiable.
The online variants (PES, ES-Single) that keep particles across truncations are not here yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import HypergradEstimator
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class AntitheticES(HypergradEstimator):
    """particles: antithetic pairs N; sigma: perturbation scale; seed: the noise is drawn from a
    generator seeded with (seed, call count), so a run is reproducible."""

    def __init__(self, particles: int = 8, sigma: float = 0.01, seed: int = 0) -> None:
        if particles < 1 or sigma <= 0:
            raise ConfigError(f"ES needs particles >= 1 and sigma > 0, got {particles} and {sigma}")
        self.particles, self.sigma, self.seed, self.calls = particles, sigma, seed, 0

    @torch.no_grad()
    def _outer_loss(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> float:
        total = 0.0
        for episode in episodes:
            with torch.enable_grad():  # the inner loop takes gradients of w, never of phi
                params, _ = problem.adapt_to(episode, second_order=False, differentiable_steps=0)
            total += problem.query_loss(params, episode)[0].item() / len(episodes)
        return total

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        if not episodes:
            raise ConfigError("a meta-batch needs at least one episode")
        phi = problem.meta_parameters()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        grads = [torch.zeros_like(p) for p in phi]
        differences = []
        with torch.no_grad():
            saved = [p.detach().clone() for p in phi]
            for _ in range(self.particles):
                eps = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in phi]
                for p, s, e in zip(phi, saved, eps):
                    p.copy_(s + self.sigma * e)
                plus = self._outer_loss(problem, episodes)
                for p, s, e in zip(phi, saved, eps):
                    p.copy_(s - self.sigma * e)
                minus = self._outer_loss(problem, episodes)
                for p, s in zip(phi, saved):
                    p.copy_(s)  # phi exactly as it was
                differences.append(plus - minus)
                for g, e in zip(grads, eps):
                    g.add_((plus - minus) / (2 * self.particles * self.sigma) * e)
        center = self._outer_loss(problem, episodes)
        spread = torch.tensor(differences).abs().mean().item()
        return HypergradOut(grads=list(grads), outer_loss=center, metrics={"loss": center, "es_abs_difference": spread})
