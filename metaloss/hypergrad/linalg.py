"""Matrix-free linear solves A x = b for symmetric A given as a matrix-vector product over lists of
tensors (one per parameter), as implicit hypergradients need them (A = Hessian of the inner loss)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Vec = list[Tensor]
MatVec = Callable[[Vec], Vec]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def axpy(alpha: Tensor | float, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vec:
    """alpha * x + y."""
    return [alpha * xi + yi for xi, yi in zip(x, y)]


def relative_residual(matvec: MatVec, x: Vec, b: Vec) -> float:
    """||A x - b|| / ||b||."""
    r = axpy(-1.0, matvec(x), b)
    return (torch.sqrt(dot(r, r)) / torch.sqrt(dot(b, b)).clamp_min(1e-300)).item()


def conjugate_gradient(matvec: MatVec, b: Vec, iterations: int, tol: float = 1e-10) -> tuple[Vec, int]:
    """Conjugate gradient (Hestenes & Stiefel 1952) for symmetric positive-definite A, from x = 0.
    Stops when ||r|| <= tol * ||b|| or after `iterations`; returns (x, iterations used)."""
    x = [torch.zeros_like(bi) for bi in b]
    r = [bi.clone() for bi in b]
    p = [ri.clone() for ri in r]
    rr = dot(r, r)
    threshold = tol**2 * rr
    used = 0
    for used in range(1, iterations + 1):
        if rr <= threshold:
            used -= 1
            break
        ap = matvec(p)
        alpha = rr / dot(p, ap)
        x = axpy(alpha, p, x)
        r = axpy(-alpha, ap, r)
        rr_new = dot(r, r)
        p = axpy(rr_new / rr, p, r)
        rr = rr_new
    return x, used


def neumann_series(matvec: MatVec, b: Vec, iterations: int, alpha: float = 1.0) -> tuple[Vec, int]:
    """A^{-1} b ~= alpha sum_{k=0}^{K} (I - alpha A)^k b (Lorraine et al. 2020); converges when the
    eigenvalues of alpha A lie in (0, 2). Returns (x, K)."""
    term = [bi.clone() for bi in b]
    total = [bi.clone() for bi in b]
    for _ in range(iterations):
        term = axpy(-alpha, matvec(term), term)
        total = [t + s for t, s in zip(total, term)]
    return [alpha * t for t in total], iterations
