"""Inner optimizers as meta-learned objects: `forward()` returns an `InnerOptimizer`
built from the module's current tensors, so gradients reach its hyperparameters."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from metaloss.errors import ConfigError
from metaloss.inner.optim import OPTIMIZERS, InnerOptimizer


def _key(name: str) -> str:
    return name.replace(".", "__")  # nn.ParameterDict keys may not contain dots


class HyperparameterOptimizer(nn.Module):
    """A named inner optimizer (`sgd`, `adam`) whose hyperparameters in `learn` are meta-parameters.

    HyperparameterOptimizer("sgd", lr=0.01) is a fixed SGD; with learn=["lr", "momentum"]
    the scalar learning rate and momentum receive hypergradients (Maclaurin et al. 2015).
    """

    def __init__(self, name: str = "sgd", learn: Iterable[str] = (), **hyperparameters: float) -> None:
        super().__init__()
        if name not in OPTIMIZERS:
            raise ConfigError(f"unknown inner optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
        self.name = name
        try:
            OPTIMIZERS[name](**hyperparameters)  # validates names and values now, not mid-run
        except TypeError as err:
            raise ConfigError(f"inner optimizer {name!r}: {err}") from None
        learn = list(learn)
        unknown = [h for h in learn if h not in hyperparameters]
        if unknown:
            raise ConfigError(f"cannot learn {unknown}: give them a starting value among {sorted(hyperparameters)}")
        self.fixed = {h: v for h, v in hyperparameters.items() if h not in learn}
        self.learned = nn.ParameterDict({h: nn.Parameter(torch.tensor(float(hyperparameters[h]))) for h in learn})

    def forward(self) -> InnerOptimizer:
        return OPTIMIZERS[self.name](**self.fixed, **dict(self.learned.items()))


class MetaSGD(nn.Module):
    """Meta-SGD (Li et al. 2017): SGD with a learned learning rate for every element of every parameter.

    w <- w - alpha (elementwise) grad, alpha has the shape of w and is a meta-parameter.
    """

    def __init__(self, model: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        if lr < 0:
            raise ConfigError(f"inner learning rate must be >= 0, got {lr}")
        self.names = [name for name, _ in model.named_parameters()]
        self.lrs = nn.ParameterDict(
            {_key(name): nn.Parameter(torch.full_like(p.detach(), float(lr))) for name, p in model.named_parameters()}
        )

    def forward(self) -> InnerOptimizer:
        return OPTIMIZERS["sgd"](lr={name: self.lrs[_key(name)] for name in self.names})


class PerStepSGD(nn.Module):
    """MAML++'s learned per-layer per-step learning rates (LSLR; Antoniou et al. 2019, "How to train
    your MAML"): SGD whose step t moves each parameter tensor n by its own learned rate,

        w_n <- w_n - alpha_n[min(t, steps - 1)] grad_n,    alpha_n: [steps], a meta-parameter,

    so the rates of the first and the later inner steps, and of every layer, are meta-learned apart.
    Steps beyond `steps` (e.g. a longer meta-test) take the last step's rates. The step count is the
    optimizer state."""

    def __init__(self, model: nn.Module, steps: int = 1, lr: float = 0.01) -> None:
        super().__init__()
        if steps < 1 or lr < 0:
            raise ConfigError(f"per-step learning rates need steps >= 1 and lr >= 0, got {steps} and {lr}")
        self.names, self.steps = [name for name, _ in model.named_parameters()], int(steps)
        self.lrs = nn.ParameterDict({_key(name): nn.Parameter(torch.full((self.steps,), float(lr)))
                                     for name in self.names})  # fmt: skip

    def forward(self) -> InnerOptimizer:
        rates = {name: self.lrs[_key(name)] for name in self.names}
        last = self.steps - 1

        def init(params: dict) -> dict:
            return {"t": 0}

        def update(grads: dict, state: dict, params: dict) -> tuple[dict, dict]:
            t = min(int(state["t"]), last)
            return {n: w - rates[n][t] * grads[n] for n, w in params.items()}, {"t": int(state["t"]) + 1}

        return InnerOptimizer(init, update)


class WarpPreconditioner(nn.Module):
    """NPBML's learned preconditioner (Raymond et al. 2024, "Meta-Learning Neural Procedural
    Biases", after Meta-Curvature, Park & Oliva 2019, and the warp layers of WarpGrad, Flennerhag
    et al. 2020): a block-diagonal preconditioned SGD, one block per parameter tensor, each block a
    Kronecker product of two learned factors initialised at the identity (so it starts as SGD):

        W <- W - lr * L G R,   G = dL/dW reshaped [out, rest],  L [out, out],  R [rest, rest]

    A factor over more than `max_block` rows is diagonal instead (a learned scale per row), and a
    1-D parameter (a bias) has only L. The factors are meta-parameters; `lr` is fixed."""

    def __init__(self, model: nn.Module | None = None, lr: float = 0.01, max_block: int = 1024,
                 shapes: dict[str, list[int]] | None = None) -> None:  # fmt: skip
        super().__init__()
        if lr < 0:
            raise ConfigError(f"inner learning rate must be >= 0, got {lr}")
        if max_block < 1:
            raise ConfigError(f"max_block must be >= 1, got {max_block}")
        if (model is None) == (shapes is None):
            raise ConfigError("WarpPreconditioner needs the model or the parameter shapes (one of them)")
        self.lr, self.max_block = float(lr), int(max_block)
        dtype = torch.get_default_dtype()
        if model is not None:
            shapes = {name: list(p.shape) for name, p in model.named_parameters()}
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), dtype)
        assert shapes is not None
        self.shapes = {name: [int(n) for n in shape] for name, shape in shapes.items()}
        self.names = list(self.shapes)
        self.left, self.right = nn.ParameterDict(), nn.ParameterDict()
        for name, shape in self.shapes.items():
            self.left[_key(name)] = nn.Parameter(self._identity(shape[0] if shape else 1, dtype))
            if len(shape) >= 2:
                self.right[_key(name)] = nn.Parameter(self._identity(math.prod(shape[1:]), dtype))

    def config(self) -> dict:
        """The constructor arguments that rebuild this module (`metaloss.io`)."""
        return {"lr": self.lr, "max_block": self.max_block, "shapes": self.shapes}

    def _identity(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.eye(n, dtype=dtype) if n <= self.max_block else torch.ones(n, dtype=dtype)

    @staticmethod
    def _multiply(factor: torch.Tensor, g: torch.Tensor, side: str) -> torch.Tensor:
        """factor @ g (left) or g @ factor (right); a diagonal factor (a vector) scales rows/columns."""
        if factor.dim() == 1:
            return factor[:, None] * g if side == "left" else g * factor[None, :]
        return factor @ g if side == "left" else g @ factor

    def forward(self) -> InnerOptimizer:
        left = {name: self.left[_key(name)] for name in self.names}  # read now: phi may be swapped in
        right = {name: self.right[_key(name)] for name in self.names if _key(name) in self.right}
        lr = self.lr

        def init(params):
            return {}

        def update(grads, state, params):
            new = {}
            for name, w in params.items():
                g = grads[name].reshape(w.shape[0] if w.dim() else 1, -1)  # [out, rest]
                g = self._multiply(left[name], g, "left")
                if name in right:
                    g = self._multiply(right[name], g, "right")
                new[name] = w - lr * g.reshape(w.shape)
            return new, state

        return InnerOptimizer(init, update)


class MLPUpdateRule(nn.Module):
    """A learned per-parameter update rule in the style of learned_optimization's MLP optimizer
    (Metz et al. 2022, "Practical tradeoffs between memory, compute, and performance in learned
    optimizers"): a small MLP applied to every parameter element's features

        f = [w, g, m_1 .. m_k, g / sqrt(v + eps)],   m_i = b_i m_i + (1 - b_i) g,   v = 0.999 v + 0.001 g^2

    each feature normalised by its root mean square over the tensor, gives a direction d and a
    log-magnitude s; the step is  w <- w - step_mult * d * exp(exp_mult * s). The MLP's weights
    are meta-parameters; the momenta are the optimizer's state."""

    def __init__(self, hidden: int = 32, decays: Iterable[float] = (0.5, 0.9, 0.99), step_mult: float = 1e-3,
                 exp_mult: float = 1e-3) -> None:  # fmt: skip
        super().__init__()
        self.decays = [float(b) for b in decays]
        if not all(0.0 <= b < 1.0 for b in self.decays):
            raise ConfigError(f"momentum decays must lie in [0, 1), got {self.decays}")
        if hidden < 1 or step_mult <= 0:
            raise ConfigError(f"need hidden >= 1 and step_mult > 0, got {hidden} and {step_mult}")
        self.step_mult, self.exp_mult = float(step_mult), float(exp_mult)
        features = 3 + len(self.decays)
        self.hidden = int(hidden)
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2))  # fmt: skip

    def config(self) -> dict:
        return {"hidden": self.hidden, "decays": self.decays, "step_mult": self.step_mult, "exp_mult": self.exp_mult}

    def forward(self) -> InnerOptimizer:
        from torch.func import functional_call

        weights = dict(self.net.named_parameters())  # read now: phi may be swapped in
        decays, net = self.decays, self.net
        step_mult, exp_mult = self.step_mult, self.exp_mult

        def init(params):
            zeros = {name: torch.zeros_like(p) for name, p in params.items()}
            return {"m": [dict(zeros) for _ in decays], "v": dict(zeros)}

        def update(grads, state, params):
            new, momenta, second = {}, [{} for _ in decays], {}
            for name, w in params.items():
                g = grads[name]
                ms = [b * state["m"][i][name] + (1 - b) * g for i, b in enumerate(decays)]
                v = 0.999 * state["v"][name] + 0.001 * g * g
                raw = [w, g, *ms, g * torch.rsqrt(v + 1e-8)]
                f = torch.stack([x / torch.sqrt((x * x).mean() + 1e-6) for x in raw], -1)  # [*w.shape, F]
                out = functional_call(net, weights, (f,))  # [*w.shape, 2]
                new[name] = w - step_mult * out[..., 0] * torch.exp(exp_mult * out[..., 1])
                for i, m in enumerate(ms):
                    momenta[i][name] = m
                second[name] = v
            return new, {"m": momenta, "v": second}

        return InnerOptimizer(init, update)
