"""The presets: named starting points (shapes, data, run length) and, per optimizer, its tuned
hyperparameter row. Where each row comes from — the lr grids and pilots behind it — is in the
comment above it, pointing at the committed results (experiments/, docs/WHEN_TO_USE_SOPHIA.md).

``config.make_config(preset, …)`` starts from a preset's ``values``; ``config.resolve`` fills
the optimizer hyperparameters left unset from the preset's row for the chosen optimizer
(``registry.OPTIMIZERS[name].row``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import OFFICIAL_DEFAULTS

__all__ = ["PRESETS", "WEN_2025_130M_SOPHIA", "WEN_2025_130M_WARMUP", "OptimizerHparams",
           "Preset"]

@dataclass(frozen=True)
class OptimizerHparams:
    """One optimizer's tuned hyperparameters in a preset (``rho`` is used by Sophia only).

    For ``muon`` the row is Muon's (on the hidden matrices; ``betas[0]`` is its momentum,
    ``betas[1]`` unused); its AdamW part (embeddings, norms, biases) takes the preset's
    ``adamw`` row, its lr scaled alike when Muon's lr is (lr grid, ``--lr``).
    """

    lr: float
    min_lr: float
    betas: tuple[float, float]
    weight_decay: float
    rho: float = 0.0


@dataclass(frozen=True)
class Preset:
    """A named starting point: flat field values plus a hyperparameter row per optimizer."""

    description: str
    values: dict[str, Any]
    optimizers: dict[str, OptimizerHparams] = field(default_factory=dict)


# Sophia's tuned settings at 130M parameters in Wen, Hall, Ma, Liang 2025 ("Fantastic Pretraining
# Optimizers and Where to Find Them", arXiv 2509.02046; marin-community/marin,
# experiments/optimizer_sweep): Llama-style, 128 x 4096 tokens a step, levanter's SophiaH (their
# "Sophia" is Hutchinson's estimator). Best there: lr 4e-3 (2e-3 at 8x Chinchilla), beta1 0.95,
# beta2 0.99 (0.9-0.99 within noise), gamma 0.0125, weight decay 0.2, lr floor 0, warmup 4000
# steps (500 and 1000 diverged). The mapping to this package (tests/optim/test_rho_mapping.py):
# levanter's h is the Hutchinson diagonal of the mean loss's Hessian with no batch factor, and
# so is SophiaH's here; SophiaG's h = B·g⊙g has the Gauss-Newton diagonal of the mean loss as
# its mean, whatever the refresh batch B. Both divide |m| by gamma·h, so rho = gamma.
WEN_2025_130M_SOPHIA = OptimizerHparams(4e-3, 0.0, (0.95, 0.99), 0.2, 0.0125)
WEN_2025_130M_WARMUP = 4000


def _gpt2(n_layer: int, n_head: int, n_embd: int, adamw: tuple, sophiag: tuple,
          sophia_row: OptimizerHparams | None = None, warmup_steps: int = 2000) -> Preset:
    """The paper's GPT-2 recipe (Liu et al., 2023, Table/Appendix; nanoGPT on OpenWebText);
    ``sophia_row``, when given, replaces its Sophia-G and Sophia-H rows."""
    adam_lr, adam_min = adamw
    sophia_lr, sophia_min, rho = sophiag
    paper_sophia = OptimizerHparams(sophia_lr, sophia_min, (0.965, 0.99), 0.2, rho)
    sophia = sophia_row or paper_sophia
    return Preset(
        description=f"GPT-2 {n_layer}L/{n_head}H/{n_embd}: 480x1024 tokens/step, 100k steps, bf16",
        values=dict(
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, dropout=0.0,
            tokenizer="bpe", bpe_vocab_size=50304,
            batch_size=8, grad_accum=60, max_steps=100_000, warmup_steps=warmup_steps,
            grad_clip=1.0,
            refresh_every=10, refresh_fraction=0.25, dtype="bfloat16",
            eval_every=1000, eval_batches=200, checkpoint_every=1000,
        ),
        optimizers={
            "adamw": OptimizerHparams(adam_lr, adam_min, (0.9, 0.95), 0.1),
            "sophiag": sophia,
            # SophiaH borrows Sophia-G's row; Lion follows its paper's advice of a 3-10x
            # smaller lr and a 3-10x larger decay than AdamW.
            "sophiah": sophia,
            "lion": OptimizerHparams(adam_lr / 5, adam_min / 5, (0.9, 0.99), 1.0),
            # Not tuned at this size: Muon's usual lr 0.02, floor at AdamW's ratio.
            "muon": OptimizerHparams(0.02, 0.02 * adam_min / adam_lr, (0.95, 0.0), 0.1),
            # The part beside Muon (fixed at its row) starts from the optimizer's own row.
            "muon-adamw": OptimizerHparams(adam_lr, adam_min, (0.9, 0.95), 0.1),
            "muon-sophiag": sophia,
        },
    )


# Tuned on the lr grid; why Sophia's rho is far above the paper's 0.05 and why Sophia-G's
# beta1 is 0.9, not the paper's 0.965: experiments/RESULTS.md, "Harness: tiny comparison" and
# "Convergence".
_TINY_ROWS = {
    "adamw": OptimizerHparams(3e-3, 3e-4, (0.9, 0.95), 0.1),
    "sophiag": OptimizerHparams(1e-3, 1e-4, (0.9, 0.99), 0.2, 2.0),
    "sophiah": OptimizerHparams(1e-3, 1e-4, (0.965, 0.99), 0.2, 2.0),
    "lion": OptimizerHparams(1e-3, 1e-4, (0.9, 0.99), 1.0),
    # Muon's lr: the best of a 100-step pilot over 0.005-0.1 (docs/HARNESS.md).
    "muon": OptimizerHparams(0.05, 0.005, (0.95, 0.0), 0.1),
    # Muon at its row on the hidden matrices; the part beside it starts from its own row.
    "muon-adamw": OptimizerHparams(3e-3, 3e-4, (0.9, 0.95), 0.1),
    "muon-sophiag": OptimizerHparams(1e-3, 1e-4, (0.9, 0.99), 0.2, 2.0),
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        description="0.8M parameters, bytes, context 64: hundreds of steps a minute on CPU",
        # One thread: its matrices are too small for more to pay (docs/HARNESS.md).
        values={"threads": 1},
        optimizers=_TINY_ROWS,
    ),
    # A step towards the paper's setting that one CPU can still run to 2000 steps
    # in under an hour: BPE tokens, context 256, 5.3M parameters (3.2M outside the tied
    # embedding), 8x256 = 2048 tokens a step (the tiny preset's tokens per step).
    "small": Preset(
        description="5.3M parameters, BPE 8192, context 256: 2000 steps in 35-40 minutes on "
                    "one CPU core",
        values=dict(
            n_layer=4, n_head=4, n_embd=256, block_size=256, dropout=0.0,
            tokenizer="bpe", bpe_vocab_size=8192,
            batch_size=8, grad_accum=1, max_steps=2000, warmup_steps=100,
            eval_every=100, eval_batches=16,  # 32k validation tokens
        ),
        # Tiny's rows, the lrs of AdamW and Sophia-G replaced by the best of a 200-step pilot
        # (experiments/RESULTS.md, "Scale: the small preset"; Muon's pilot kept tiny's 0.05);
        # Sophia-H borrows Sophia-G's row, Lion keeps tiny's (not piloted).
        optimizers={
            **_TINY_ROWS,
            "adamw": OptimizerHparams(1e-3, 1e-4, (0.9, 0.95), 0.1),
            "sophiag": OptimizerHparams(3.33e-4, 3.33e-5, (0.9, 0.99), 0.2, 2.0),
            "sophiah": OptimizerHparams(3.33e-4, 3.33e-5, (0.9, 0.99), 0.2, 2.0),
            "muon-adamw": OptimizerHparams(1e-3, 1e-4, (0.9, 0.95), 0.1),
            "muon-sophiag": OptimizerHparams(3.33e-4, 3.33e-5, (0.9, 0.99), 0.2, 2.0),
        },
    ),
    # Sophia from the outside evidence (WEN_2025_130M_SOPHIA, its warmup for every optimizer):
    # a GPU user starts from settings that were tuned at this size and did not diverge.
    "gpt2-small": _gpt2(12, 12, 768, adamw=(6e-4, 3e-5), sophiag=(6e-4, 1.5e-5, 0.05),
                        sophia_row=WEN_2025_130M_SOPHIA, warmup_steps=WEN_2025_130M_WARMUP),
    "gpt2-medium": _gpt2(24, 16, 1024, adamw=(3e-4, 6e-5), sophiag=(7e-4, 1e-5, 0.08)),
    "gpt2-large": _gpt2(36, 20, 1280, adamw=(2e-4, 1e-5), sophiag=(3e-4, 1e-5, 0.05)),
}


def _official_row(sophiag: OptimizerHparams) -> OptimizerHparams:
    """``sophiag-official``'s row: the authors' betas, rho and weight decay
    (``sophia_pytorch.OFFICIAL_DEFAULTS``) at the preset's Sophia-G lr and floor (the authors'
    default lr, 1e-4, was never a tuned value for a model size)."""
    return OptimizerHparams(sophiag.lr, sophiag.min_lr, tuple(OFFICIAL_DEFAULTS["betas"]),
                            OFFICIAL_DEFAULTS["weight_decay"], OFFICIAL_DEFAULTS["rho"])


for _preset in PRESETS.values():
    _preset.optimizers.setdefault("sophiag-official", _official_row(_preset.optimizers["sophiag"]))
