"""Meta-learned initialisations w0(phi)."""

from __future__ import annotations

import copy
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metaloss.errors import ConfigError
from metaloss.losses import class_means
from metaloss.types import Episode, Params


def hold_at_zero(module: nn.Module) -> None:
    """Zero `module`'s parameters and take them out of phi (requires_grad False): the outer optimizer
    never moves them."""
    for p in module.parameters():
        p.detach().zero_()
        p.requires_grad_(False)


class LearnedInit(nn.Module):
    """w0 = phi: the model's own parameters are the initialisation (MAML, Finn et al. 2017).

    Wraps the model so that its parameters are meta-parameters; `forward()`
    returns them as a dict, which the inner loop adapts without touching them.

    zeroed: modules (e.g. `["head"]`) whose parameters start every task at zero and are not phi,
    the "zeroing trick" of Kao et al. (2022, "MAML is a noisy contrastive learner"): with labels
    permuted per episode a learned head initialisation is noise, and from W = 0, b = 0 one inner SGD
    step on the mean cross-entropy of a balanced N-way support set gives W_k = lr (c_k - c) / N, with
    c_k class k's mean feature and c the mean of all: a prototype classifier.
    """

    def __init__(self, model: nn.Module, zeroed: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.zeroed = list(zeroed)
        modules = dict(model.named_modules())
        for name in self.zeroed:
            if name not in modules or not list(modules[name].parameters()):
                raise ConfigError(f"init.zeroed: the model has no module {name!r} with parameters")
            hold_at_zero(modules[name])

    def forward(self) -> Params:
        return dict(self.model.named_parameters())


class FixedInit(nn.Module):
    """w0 = the model's parameters at construction, not meta-learned (every task starts there):
    for problems whose phi lives elsewhere, e.g. a learned L2 penalty or a learned loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = [name for name, _ in model.named_parameters()]
        for name, p in model.named_parameters():  # buffers: they follow .to(), and are not phi
            self.register_buffer(name.replace(".", "__"), p.detach().clone())

    def forward(self) -> Params:
        return {name: getattr(self, name.replace(".", "__")) for name in self.names}


class PrototypeHeadInit(nn.Module):
    """Proto-MAML's initialisation (Triantafillou et al. 2020, "Meta-Dataset", sec. 3): the body's
    w0 is phi, as in MAML; the linear head's w0 is the prototypical network's classifier on the
    episode's support set (Snell et al. 2017),

        W_k = 2 c_k,   b_k = -||c_k||^2,   c_k = mean of f(x_i; phi) over the support examples of class k,

    so that W f + b = -||f - c_k||^2 + ||f||^2 (squared Euclidean distances up to a term shared by
    the classes). The prototypes are functions of phi: the meta-gradient flows through them into the
    body. The model needs `split()` -> (body, head) with a linear head, forward = head(body(x)), and
    no per-step BatchNorm; its own head is held at zero and is not phi (what `forward()` returns
    without an episode, for shape checks). The body runs on the support set as the first inner step
    does (BatchNorm on the support batch)."""

    needs_episode = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        split = getattr(model, "split", None)
        if split is None or getattr(model, "takes_step", False):
            raise ConfigError("init=proto_head needs a model with split() (body, head) and no per-step BatchNorm")
        self.body_name, self.head_name = split()
        if not isinstance(getattr(model, self.head_name), nn.Linear):
            raise ConfigError("init=proto_head needs a linear head")
        self.model = model
        hold_at_zero(getattr(model, self.head_name))

    def forward(self, episode: Episode | None = None) -> Params:
        params = dict(self.model.named_parameters())
        if episode is None:
            return params
        if episode.support_y.is_floating_point():
            raise ConfigError("init=proto_head needs class labels (a classification task), got floating-point targets")
        head = getattr(self.model, self.head_name)
        features = getattr(self.model, self.body_name)(episode.support_x)  # [n, D]
        members = nn.functional.one_hot(episode.support_y, head.out_features).to(features.dtype)  # [n, N]
        prototypes = class_means(features, members)  # [N, D]
        params[f"{self.head_name}.weight"] = 2 * prototypes
        params[f"{self.head_name}.bias"] = -(prototypes**2).sum(1)
        return params


_draw_lock = threading.Lock()


class RandomInit(nn.Module):
    """w0 drawn afresh for every episode with the model's own initialisation scheme (each module's
    `reset_parameters()`), not meta-learned: ML3 (Bechtle et al. 2021) trains a freshly
    initialised model in every episode, so that the learned loss, not a starting point, carries
    what is learned.

    The draw is seeded by (`seed`, the episode's content), so it is a function of the episode: the
    particles of an ES estimate, a resumed run and a re-evaluation all see the same w0 for the same
    episode, and different episodes see independent draws."""

    needs_episode = True

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.template = copy.deepcopy(model).requires_grad_(False)  # drawn into; its weights are never phi
        self.names = [name for name, _ in model.named_parameters()]

    def forward(self, episode: Episode | None = None) -> Params:
        key = self.seed if episode is None else zlib.crc32(_fingerprint(episode), self.seed & 0xFFFFFFFF)
        # one draw at a time: it reseeds the global generator and draws into the shared template, and
        # tasks may run on several threads (metaloss.hypergrad.threads)
        with _draw_lock, torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(key)
            for module in self.template.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            params = dict(self.template.named_parameters())
            return {name: params[name].detach().clone() for name in self.names}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}  # nothing learned and nothing fixed: the seed is configuration

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return None


def _fingerprint(episode: Episode) -> bytes:
    """The bytes of the episode's support set (its inputs and targets)."""
    x, y = episode.support_x.detach().cpu().contiguous(), episode.support_y.detach().cpu().contiguous()
    return x.numpy().tobytes() + y.numpy().tobytes()
