"""sophia_pytorch: Sophia, the second-order clipped optimizer, native to PyTorch.

    >>> from sophia_pytorch import SophiaG, sampled_cross_entropy
"""

from .estimators import (
    hutchinson_estimate,
    rademacher_like,
    sampled_binary_cross_entropy,
    sampled_cross_entropy,
    sampled_gaussian_nll,
)
from .optimizer import OFFICIAL_DEFAULTS, SophiaBase, SophiaG, SophiaH

__all__ = [
    "OFFICIAL_DEFAULTS",
    "SophiaBase",
    "SophiaG",
    "SophiaH",
    "sampled_cross_entropy",
    "sampled_gaussian_nll",
    "sampled_binary_cross_entropy",
    "hutchinson_estimate",
    "rademacher_like",
]
__version__ = "0.1.0"
