"""Muon for the draft's hidden matrices, AdamW for the rest, as one optimizer for the Trainer.

`torch.optim.Muon` orthogonalises 2-D updates; it suits the hidden weight matrices (the decoder
layer's projections and fc) and not the embedding or LM head (speculators and Keller Jordan's
Muon leave those, and norms and biases, to AdamW). `ChainedOptimizer` steps both and looks like
one optimizer: its `param_groups` list both (so the Trainer's LR scheduler scales both) and its
`state_dict` / `load_state_dict` round-trip both (so checkpoints and --resume carry both).
"""

from __future__ import annotations

from collections import ChainMap

import torch

MUON_MODULES = ("fc.", "midlayer.", "layers.")  # the draft's hidden matrices live here (eagle3, eagle1)


def goes_to_muon(name: str, param: torch.nn.Parameter) -> bool:
    """A trainable 2-D matrix (both sides > 1) inside the draft's fc or decoder layer(s); `name` is
    relative to the draft ("midlayer.mlp.up_proj.weight")."""
    return (param.requires_grad and param.ndim == 2 and min(param.shape) > 1
            and name.startswith(MUON_MODULES))


def make_muon(params, lr: float, weight_decay: float, momentum: float, ns_steps: int = 5) -> torch.optim.Muon:
    """Muon as speculators runs it: Nesterov momentum, 5 Newton-Schulz steps (`ns_steps`: fewer cost
    less, on a CPU a large share of a step, and orthogonalise less exactly), updates scaled to AdamW's
    RMS (`match_rms_adamw`), so it shares AdamW's learning rate."""
    return torch.optim.Muon(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                            ns_steps=ns_steps, adjust_lr_fn="match_rms_adamw")


class ChainedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together and saved together."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        params = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        super().__init__(params, {})
        self._sync()

    def _sync(self) -> None:
        """The groups and state of the inner optimizers, the same objects (a scheduler's lr change
        reaches them); called again after `load_state_dict`, which gives them new group dicts."""
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]
        self.state = ChainMap(*(opt.state for opt in self.optimizers))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"chained": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("chained")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError(f"an optimizer state of {len(saved) if saved else 'another kind'} optimizer(s), "
                             f"not {len(self.optimizers)} chained ones (was the checkpoint made with muon "
                             f"{'off' if saved is None else 'set otherwise'}?)")
        for opt, part in zip(self.optimizers, saved):
            opt.load_state_dict(part)
        self._sync()
