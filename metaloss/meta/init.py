"""Meta-learned initialisations w0(phi)."""

from __future__ import annotations

from torch import nn

from metaloss.types import Params


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
