"""The harness's Hessian refreshes accept only the Sophia they refresh, and say so."""

import contextlib

import pytest
import torch
from torch import nn

from sophia_pytorch import SophiaG, SophiaH
from sophia_pytorch.harness.hessian import GaussNewtonBartlett, Hutchinson


def _build(refresh_class, optimizer):
    return refresh_class(optimizer, nn.Linear(2, 2), rows=1, autocast=contextlib.nullcontext,
                         seed=0, rank=0, world_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize(("refresh_class", "wrong"), [
    (GaussNewtonBartlett, SophiaH), (Hutchinson, SophiaG),
    (GaussNewtonBartlett, torch.optim.AdamW)])
def test_a_refresh_refuses_an_optimizer_it_cannot_refresh(refresh_class, wrong) -> None:
    optimizer = wrong(nn.Linear(2, 2).parameters())
    with pytest.raises(TypeError, match=f"{refresh_class.__name__} refreshes a sophia_pytorch "
                                        f".*got {wrong.__name__}"):
        _build(refresh_class, optimizer)


@pytest.mark.parametrize(("refresh_class", "right"), [
    (GaussNewtonBartlett, SophiaG), (Hutchinson, SophiaH)])
def test_a_refresh_takes_its_own_sophia(refresh_class, right) -> None:
    optimizer = right(nn.Linear(2, 2).parameters())
    assert _build(refresh_class, optimizer).optimizer is optimizer
