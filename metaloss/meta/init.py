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
