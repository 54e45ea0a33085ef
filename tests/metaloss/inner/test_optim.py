"""Inner optimizers reproduce torch.optim step for step, and validate their inputs; the averaging
wrapper keeps its optimizer's iterates and their moving average with the warm-up, as a stop-gradient."""

from __future__ import annotations

import pytest
import torch

from metaloss.errors import ConfigError
from metaloss.functional import tree_detach
from metaloss.inner.optim import adam, averaged, sgd


def quadratic_grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # gradient of sum_i (i + 1) * p_i^2 / 2 + sin(p_i): elementwise, non-trivial
    return {n: torch.arange(1, p.numel() + 1, dtype=p.dtype).view_as(p) * p + torch.cos(p) for n, p in params.items()}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
        (lambda: sgd(0.05, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
        (
            lambda: sgd(0.05, momentum=0.8, weight_decay=0.01, nesterov=True),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, weight_decay=0.01, nesterov=True),
        ),
        (lambda: adam(0.01, eps_root=0.0), lambda ps: torch.optim.Adam(ps, lr=0.01)),
        (
            lambda: adam(0.02, beta1=0.5, beta2=0.9, eps=1e-6, eps_root=0.0),
            lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.5, 0.9), eps=1e-6),
        ),
    ],
)
def test_matches_torch_optim(ours, theirs) -> None:
    g = torch.Generator().manual_seed(0)
    start = {
        "a": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(4, generator=g, dtype=torch.float64),
    }
    reference = {n: p.clone().requires_grad_() for n, p in start.items()}
    torch_opt = theirs(list(reference.values()))
    opt = ours()
    params, state = dict(start), opt.init(start)
    for _ in range(6):
        params, state = opt.update(quadratic_grads(params), state, params)
        grads = quadratic_grads({n: p.detach() for n, p in reference.items()})
        for n, p in reference.items():
            p.grad = grads[n]
        torch_opt.step()
    for n in start:
        torch.testing.assert_close(params[n], reference[n].detach(), rtol=1e-12, atol=1e-12)


def test_per_parameter_learning_rates() -> None:
    params = {"a": torch.ones(2), "b": torch.ones(3)}
    lr = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor(0.5)}
    new, _ = sgd(lr).update({"a": torch.ones(2), "b": torch.ones(3)}, {}, params)
    torch.testing.assert_close(new["a"], torch.tensor([0.9, 0.8]))
    torch.testing.assert_close(new["b"], torch.full((3,), 0.5))


def test_updates_are_pure() -> None:
    params = {"a": torch.ones(2)}
    opt = adam(0.1)
    state = opt.init(params)
    new, new_state = opt.update({"a": torch.ones(2)}, state, params)
    assert (
        torch.equal(params["a"], torch.ones(2)) and state["step"] == 0 and torch.equal(state["m"]["a"], torch.zeros(2))
    )
    assert new_state["step"] == 1 and not torch.equal(new["a"], params["a"])


def test_adam_second_order_is_finite_where_a_gradient_is_zero() -> None:
    w = torch.tensor([0.0, 1.0], requires_grad=True)
    opt = adam(0.1)
    g = torch.autograd.grad((w[1] ** 2), w, create_graph=True)[0]  # g[0] == 0 exactly
    new, _ = opt.update({"w": g}, opt.init({"w": w}), {"w": w})
    (grad_w,) = torch.autograd.grad(new["w"].sum(), w)
    assert torch.isfinite(grad_w).all()


@pytest.mark.parametrize("make", [lambda: sgd(-0.1), lambda: sgd(0.1, momentum=-1), lambda: adam(-1e-3)])
def test_negative_hyperparameters_are_rejected(make) -> None:
    with pytest.raises(ConfigError):
        make()


def test_tree_detach_cuts_every_tensor() -> None:
    x = torch.ones(2, requires_grad=True)
    tree = {"step": 3, "m": {"a": x * 2}, "l": [x * 3, (x * 4,)]}
    out = tree_detach(tree)
    assert out["step"] == 3 and not out["m"]["a"].requires_grad
    assert not out["l"][0].requires_grad and not out["l"][1][0].requires_grad


def test_averaging_keeps_the_iterates_and_their_moving_average() -> None:
    w0 = {"a": torch.tensor([1.0, -2.0], dtype=torch.float64), "b": torch.tensor(0.5, dtype=torch.float64)}
    plain, wrapped = sgd(0.1, momentum=0.9), averaged(sgd(0.1, momentum=0.9), 0.3)
    p, s = dict(w0), plain.init(w0)
    q, t = dict(w0), wrapped.init(w0)
    want = {n: x.clone() for n, x in w0.items()}
    for n in range(1, 8):
        p, s = plain.update(quadratic_grads(p), s, p)
        q, t = wrapped.update(quadratic_grads(q), t, q)
        d = min(0.3, (1 + n) / (10 + n))  # the warm-up's 2/11 and 3/12, then the decay 0.3 from n = 3 on
        want = {k: d * want[k] + (1 - d) * p[k] for k in want}
        assert all(torch.equal(p[k], q[k]) for k in p)  # the iterates are the wrapped optimizer's
        assert t["averaged_steps"] == n
        for k in want:
            torch.testing.assert_close(t["average"][k], want[k], rtol=1e-14, atol=0)
    w = {"a": torch.ones(2, requires_grad=True)}
    _, state = averaged(sgd(0.1), 0.5).update({"a": w["a"] * 3}, averaged(sgd(0.1), 0.5).init(w), w)
    assert not state["average"]["a"].requires_grad  # a stop-gradient: no graph through the average


@pytest.mark.parametrize("decay", [1.0, -0.1, True, "0.9"])
def test_a_bad_averaging_decay_is_rejected(decay) -> None:
    with pytest.raises(ConfigError, match="averaging decay"):
        averaged(sgd(0.1), decay)
