"""Muon (Jordan et al., 2024) on the hidden matrices and AdamW on the rest, as one optimizer.

Muon orthogonalises each 2-D update with a Newton-Schulz iteration, which only makes sense for
the weight matrices inside the network; its authors keep AdamW for the embeddings, the
(tied) output head, norms and biases. :class:`MuonWithAdamW` holds torch's ``Muon`` and
``AdamW`` and shows the loop one optimizer: its ``param_groups`` are the two optimizers' own
group dicts, so an lr scheduler that writes ``group["lr"]`` drives both, and its
``state_dict`` holds both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["MuonWithAdamW", "hidden_matrices"]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights of ``model``'s ``nn.Linear`` layers that are not an embedding.

    In the harness GPT: attention qkv and projection, MLP in and out, in every block; not the
    token/position embeddings, not the output head (tied to the token embedding), not the
    LayerNorms or biases.
    """
    embeddings = {id(p) for module in model.modules() if isinstance(module, nn.Embedding)
                  for p in module.parameters()}
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None and weight.requires_grad \
                and weight.dim() == 2 and id(weight) not in embeddings:
            found.setdefault(id(weight), weight)
    return list(found.values())


class MuonWithAdamW(Optimizer):
    """torch's Muon on ``muon_params`` and AdamW on ``adamw_groups``, stepped together.

    Args:
        muon_params: 2-D parameters (see :func:`hidden_matrices`).
        adamw_groups: parameter groups for AdamW (e.g. embeddings decayed, vectors not).
        lr: Muon's learning rate (torch's "original" shape adjustment, default 0.02).
        momentum: Muon's momentum (default 0.95, Nesterov).
        weight_decay: Muon's decoupled weight decay (default 0.1).
        adamw_lr: AdamW's learning rate (default 3e-3).
        adamw_betas: AdamW's betas (default (0.9, 0.95)).
        adamw_weight_decay: AdamW's default decay for groups that do not set one (0.1).
    """

    def __init__(self, muon_params: list[nn.Parameter], adamw_groups: list[dict[str, Any]], *,
                 lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.1,
                 adamw_lr: float = 3e-3, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_weight_decay: float = 0.1) -> None:
        self.muon = torch.optim.Muon(muon_params, lr=lr, momentum=momentum,
                                     weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=adamw_lr, betas=adamw_betas,
                                       weight_decay=adamw_weight_decay)
        everything = [p for group in self._groups() for p in group["params"]]
        super().__init__(everything, {})
        self._share_groups()

    def _groups(self) -> list[dict[str, Any]]:
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def _share_groups(self) -> None:
        # The very dicts of the two optimizers: whatever writes group["lr"] reaches them.
        self.param_groups = self._groups()
        self.state = _States(self.muon.state, self.adamw.state)  # type: ignore[assignment]

    # torch's stubs type a closure as returning a float; closures return the loss Tensor.
    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @overload
    def step(self, closure: Callable[[], Tensor]) -> Tensor: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float] | None = None) -> Tensor | float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._share_groups()  # loading replaced the two optimizers' group dicts


class _States(Mapping):
    """The per-parameter states of both optimizers, read-only. (Not a ChainMap: reading a
    key through it would add an empty entry to the first optimizer's defaultdict.)"""

    def __init__(self, *states: Mapping) -> None:
        self.states = states

    def __getitem__(self, param: Any) -> Any:
        for state in self.states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[Any]:
        for state in self.states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self.states)
