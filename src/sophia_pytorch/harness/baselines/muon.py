"""Muon (Jordan et al., 2024) on the hidden matrices and another optimizer on the rest, as one.

Muon orthogonalises each 2-D update with a Newton-Schulz iteration, which only makes sense for
the weight matrices inside the network; its authors keep AdamW for the embeddings, the
(tied) output head, norms and biases (:class:`MuonWithAdamW`). :class:`MuonWithSophiaG` puts
Sophia-G there instead: the embeddings and head are where a language model's curvature spans
decades (it follows token frequency), the regime where Sophia's clipped preconditioning
should pay. Both show the loop one optimizer (:class:`MuonWith`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ...optimizer import SophiaG

__all__ = ["MuonWith", "MuonWithAdamW", "MuonWithSophiaG", "hidden_matrices"]


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


class MuonWith(Optimizer):
    """torch's Muon on the hidden matrices and another optimizer on the rest, stepped together.

    Its ``param_groups`` are the two optimizers' own group dicts (Muon's first), so an lr
    scheduler that writes ``group["lr"]`` drives both; its ``state_dict`` holds both, under
    ``"muon"`` and :attr:`rest_key`.

    Args:
        muon: torch's ``Muon`` over the hidden matrices.
        rest: the optimizer of every other trainable parameter (embeddings, head, norms).
    """

    rest_key = "rest"

    def __init__(self, muon: torch.optim.Muon, rest: Optimizer) -> None:
        self.muon, self.rest = muon, rest
        everything = [p for group in self._groups() for p in group["params"]]
        super().__init__(everything, {})
        self._share_groups()

    def _groups(self) -> list[dict[str, Any]]:
        return [*self.muon.param_groups, *self.rest.param_groups]

    def _share_groups(self) -> None:
        # The very dicts of the two optimizers: whatever writes group["lr"] reaches them.
        self.param_groups = self._groups()
        self.state = _States(self.muon.state, self.rest.state)  # type: ignore[assignment]

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
        self.rest.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), self.rest_key: self.rest.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.rest.load_state_dict(state_dict[self.rest_key])
        self._share_groups()  # loading replaced the two optimizers' group dicts


class MuonWithAdamW(MuonWith):
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

    rest_key = "adamw"

    def __init__(self, muon_params: list[nn.Parameter], adamw_groups: list[dict[str, Any]], *,
                 lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.1,
                 adamw_lr: float = 3e-3, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_weight_decay: float = 0.1) -> None:
        super().__init__(
            torch.optim.Muon(muon_params, lr=lr, momentum=momentum, weight_decay=weight_decay),
            torch.optim.AdamW(adamw_groups, lr=adamw_lr, betas=adamw_betas,
                              weight_decay=adamw_weight_decay))

    @classmethod
    def from_parts(cls, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> MuonWithAdamW:
        """The pair from two built optimizers (each with its own lr)."""
        pair = cls.__new__(cls)
        MuonWith.__init__(pair, muon, adamw)
        return pair

    @property
    def adamw(self) -> Optimizer:
        """The AdamW part."""
        return self.rest


class MuonWithSophiaG(MuonWith):
    """torch's Muon on the hidden matrices and a :class:`~sophia_pytorch.SophiaG` on the rest
    (embeddings, the tied head, norms, biases): Sophia where curvature spreads over decades.

    Its Hessian refresh feeds the SophiaG part, :attr:`hessian_optimizer`; the sampled-loss
    backward then also writes the hidden matrices' gradients, which the next step's
    ``zero_grad`` clears (the refresh runs after the step).
    """

    rest_key = "sophiag"

    def __init__(self, muon: torch.optim.Muon, sophia: SophiaG) -> None:
        super().__init__(muon, sophia)

    @property
    def hessian_optimizer(self) -> SophiaG:
        """The SophiaG part, whose h the refresh updates."""
        assert isinstance(self.rest, SophiaG)
        return self.rest


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
