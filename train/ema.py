"""Exponential moving average of the UNet's weights (the weights that are usually shipped).

The decay warms up as (1 + n) / (10 + n), capped at `decay`, as in diffusers' EMAModel,
so early averages are not dominated by the random initial weights.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, parameters, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in parameters]
        self.updates = 0

    @torch.no_grad()
    def update(self, parameters) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in parameters], 1 - decay)

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for shadow, p in zip(self.shadow, parameters):
            p.copy_(shadow.to(p.dtype))

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model")
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.shadow)]
        self.updates = int(state["updates"])
