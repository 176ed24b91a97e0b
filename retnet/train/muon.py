"""Muon for the decoder layers' weight matrices, AdamW for the rest, as one ``torch.optim.Optimizer``.

``optim.name = "muon"``: the standard recipe (Keller Jordan's reference, Moonshot's "Muon is Scalable for LLM
Training"): ``torch.optim.Muon`` (torch >= 2.9) orthogonalizes the momentum of every 2-D hidden matrix (the
retention q/k/v/g/o and the FFN gate/up/down projections of each decoder layer) with a Newton-Schulz iteration;
the embeddings, the LM head, the norms, biases and any other parameter keep AdamW, as ``optim.name = "adamw"``
trains them (no decay on norms, biases and embeddings).

The two run as one optimizer, :class:`MuonWithAdamW`: its param groups are Muon's then AdamW's (the same dicts
the two inner optimizers step) and its state is theirs (one dict keyed by parameter, which they share). So the
trainer's code for a plain AdamW (``param_groups``, ``state``, ``state_dict()``, ``load_state_dict()``,
``zero_grad()``, torch's distributed ``get_state_dict``/``set_state_dict`` of the sharded and full checkpoint
layouts) takes it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# torch.optim.Muon's learning-rate adjustments, by the parameter's shape [A, B]: "match_rms_adamw" (Moonshot)
# scales the rate by 0.2·sqrt(max(A, B)), which gives the update AdamW's RMS, so AdamW's learning rate and weight
# decay carry over; "original" (Keller Jordan) by sqrt(max(1, A/B)), which wants a rate of about 0.02.
MUON_ADJUST_LR = ("match_rms_adamw", "original")
MUON_TORCH = "2.9"  # the first torch with torch.optim.Muon


def muon_available() -> bool:
    """Whether the running torch has ``torch.optim.Muon``."""
    return hasattr(torch.optim, "Muon")


def muon_parameter_names(model: nn.Module) -> list[str]:
    """The parameters Muon trains, in ``named_parameters()`` order: the weight of every ``nn.Linear`` of the
    decoder layers (``model.model.layers``) that trains. Everything else, embeddings, LM head, norms and biases
    included, is AdamW's."""
    layers = {id(module) for layer in model.model.layers for module in layer.modules()
              if isinstance(module, nn.Linear)}
    matrices = {id(module.weight) for module in model.modules() if id(module) in layers}
    return [name for name, param in model.named_parameters()
            if id(param) in matrices and param.requires_grad and param.ndim == 2]


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` over ``muon_groups`` and ``torch.optim.AdamW`` over ``adamw_groups``, as one optimizer.

    ``param_groups`` is Muon's groups then AdamW's: the dicts the inner optimizers read (set each group's ``lr``
    there), and ``state`` is one dict of both (their parameters do not overlap). ``state_dict()`` and
    ``load_state_dict()`` are ``torch.optim.Optimizer``'s over those, so a state saves and loads as an AdamW's
    does; loading links the inner optimizers to the loaded groups and state again."""

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *,
                 muon: dict[str, Any], adamw: dict[str, Any]):
        self._muon = torch.optim.Muon(muon_groups, **muon)
        self._adamw = torch.optim.AdamW(adamw_groups, **adamw)
        self._muon_count = len(self._muon.param_groups)
        # The same group dicts, completed with each optimizer's defaults: Optimizer's __init__ keeps them as given.
        super().__init__([*self._muon.param_groups, *self._adamw.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (after __init__ and every load)."""
        self._muon.param_groups = self.param_groups[: self._muon_count]
        self._adamw.param_groups = self.param_groups[self._muon_count:]
        self._muon.state = self._adamw.state = self.state
        # A group loaded without its settings takes the defaults, as AdamW's own __setstate__ completes it: torch's
        # sharded checkpoints store the settings per parameter, so an empty group (AdamW's decayed one, when the
        # LM head is tied to the embeddings and Muon has every other matrix) comes back as {"params": []}.
        for inner in (self._muon, self._adamw):
            for group in inner.param_groups:
                for key, value in inner.defaults.items():
                    group.setdefault(key, value)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles (and deep-copies) its defaults, state and param_groups alone: without the inner
        # optimizers, which share those objects, a copy could not step
        return {**super().__getstate__(), "_muon": self._muon, "_adamw": self._adamw,
                "_muon_count": self._muon_count}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict replaces param_groups and state with new objects through here, and an unpickled copy
        # is rebuilt here
        super().__setstate__(state)
        if "_muon" in self.__dict__:
            self._link()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group added after construction is AdamW's (with AdamW's defaults), as every parameter that is not a
        decoder layer's matrix is: stepped by neither inner optimizer otherwise."""
        super().add_param_group(param_group)
        # Every group after Muon's is AdamW's, so linking again hands it to AdamW. Optimizer.__init__ adds the
        # groups given through here too (the inner optimizers exist by then): linking them one by one is harmless.
        self._link()

    @property
    def muon_groups(self) -> list[dict[str, Any]]:
        """The groups Muon steps (the first ones of ``param_groups``)."""
        return self.param_groups[: self._muon_count]

    @property
    def adamw_groups(self) -> list[dict[str, Any]]:
        """The groups AdamW steps (the rest of ``param_groups``)."""
        return self.param_groups[self._muon_count:]

    @torch.no_grad()
    def step(self, closure=None):
        """Muon's step, then AdamW's; returns ``closure()``'s loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        self._adamw.step()
        return loss


__all__ = ["MUON_ADJUST_LR", "MUON_TORCH", "MuonWithAdamW", "muon_available", "muon_parameter_names"]
