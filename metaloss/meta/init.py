"""Meta-learned initialisations w0(phi)."""

from __future__ import annotations

import copy
import threading
import zlib
from typing import Any

import torch
from torch import nn

from metaloss.types import Episode, Params


class LearnedInit(nn.Module):
    """w0 = phi: the model's own parameters are the initialisation (MAML, Finn et al. 2017).

    Wraps the model so that its parameters are meta-parameters; `forward()`
    returns them as a dict, which the inner loop adapts without touching them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

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
