"""Estimators of the Hessian diagonal that Sophia folds into its state every k steps.

* Gauss-Newton-Bartlett (Sophia-G): draw labels ŷ from the model's own softmax, back-propagate
  the mean cross-entropy on ŷ over its B samples, and take ĥ = B · ĝ ⊙ ĝ. Its expectation is
  the diagonal of the Gauss-Newton matrix of the mean loss. ``sampled_cross_entropy`` gives the
  loss and B; ``SophiaG.update_hessian(scale=B)`` does the rest from ``p.grad``.
* The same identity for other likelihoods of the exponential family: draw the targets from
  the distribution the model predicts, and the gradient of the mean sampled loss gives the
  Gauss-Newton diagonal of that loss by the same ĥ = B · ĝ ⊙ ĝ —
  ``sampled_gaussian_nll`` for regression (MSE) heads, ŷ ~ N(f, σ²), and
  ``sampled_binary_cross_entropy`` for binary and multi-label heads, ŷ ~ Bernoulli(sigmoid(f)).
* Hutchinson (Sophia-H): with u of i.i.d. ±1 entries, ĥ = u ⊙ (∇²L · u) is unbiased for the
  Hessian diagonal. ``hutchinson_estimate`` computes it with one Hessian-vector product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sampled_cross_entropy",
    "sampled_gaussian_nll",
    "sampled_binary_cross_entropy",
    "rademacher_like",
    "hutchinson_estimate",
]


@overload
def sampled_cross_entropy(
    logits: Tensor,
    *,
    targets: Tensor | None = ...,
    ignore_index: int = ...,
    mask: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    count_as_tensor: Literal[False] = ...,
) -> tuple[Tensor, int]: ...


@overload
def sampled_cross_entropy(
    logits: Tensor,
    *,
    targets: Tensor | None = ...,
    ignore_index: int = ...,
    mask: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    count_as_tensor: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def sampled_cross_entropy(
    logits: Tensor,
    *,
    targets: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    count_as_tensor: bool = False,
) -> tuple[Tensor, int] | tuple[Tensor, Tensor]:
    """Mean cross-entropy of ``logits`` against labels drawn from ``softmax(logits)``.

    The labels are drawn by the Gumbel-max trick, ``argmax(logits + G)`` with G i.i.d.
    standard Gumbel (``-log E``, E ~ Exp(1), drawn in float32 from ``generator``): exactly a
    draw from the softmax, made of elementwise ops and an argmax, which ``torch.compile`` and
    CUDA graphs capture (``torch.multinomial`` syncs with the host and breaks graphs).

    Args:
        logits: ``(..., C)`` unnormalised scores, any float dtype; classes last.
        targets: optional ``(...)`` integer tensor shaped like ``logits[..., 0]``; positions
            equal to ``ignore_index`` (padding) are left out of the mean.
        ignore_index: the value of ``targets`` that marks a position to leave out (default
            -100, as ``torch.nn.functional.cross_entropy``).
        mask: optional ``(...)`` bool tensor shaped like ``logits[..., 0]``; only positions
            where it is True enter the mean.
        generator: the random source of the draw (on ``logits``' device); default: global.
        count_as_tensor: return B as a 0-dim int64 tensor on ``logits``' device instead of a
            Python int, so that nothing waits for the device (default False). Then a draw with
            every position left out gives a loss of 0 (and no gradient) instead of raising,
            since checking would need that wait.

    Returns:
        ``(loss, num_samples)``: a 0-dim tensor whose backward gives ĝ (the draw itself
        carries no gradient), and the number B of positions in the mean. Pass B — summed over
        all data-parallel ranks — as ``SophiaG.update_hessian(scale=B)``.
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a class dimension last, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"sampled_cross_entropy needs floating-point logits, got {logits.dtype}")
    num_classes = logits.shape[-1]
    if num_classes == 1:
        raise ValueError(
            f"sampled_cross_entropy got logits of shape {tuple(logits.shape)}: one class, whose "
            "softmax is 1 and whose Gauss-Newton estimate is exactly 0. For a regression (MSE) "
            "head use sampled_gaussian_nll; for a single binary logit, "
            "sampled_binary_cross_entropy (in the integrations: hessian_loss='gaussian' or "
            "'bernoulli')"
        )
    flat_logits = logits.reshape(-1, num_classes)
    keep = _kept_positions(logits, targets=targets, ignore_index=ignore_index, mask=mask)

    with torch.no_grad():
        labels = _gumbel_max(flat_logits, generator).masked_fill(~keep, -100)
    per_position = F.cross_entropy(flat_logits, labels, ignore_index=-100, reduction="none")
    total = per_position.to(_wide(per_position.dtype)).sum()
    return _mean_over_kept(total, keep, count_as_tensor, "sampled_cross_entropy")


def _kept_positions(outputs: Tensor, *, targets: Tensor | None = None, ignore_index: int = -100,
                    mask: Tensor | None = None) -> Tensor:
    """``(N,)`` bool: which of the N = ``outputs[..., 0].numel()`` positions enter the mean."""
    keep = torch.ones(outputs.shape[:-1].numel(), dtype=torch.bool, device=outputs.device)
    for name, selector in (("targets", targets), ("mask", mask)):
        if selector is None:
            continue
        if selector.shape != outputs.shape[:-1]:
            raise ValueError(
                f"{name} must have shape {tuple(outputs.shape[:-1])} (the outputs' shape "
                f"{tuple(outputs.shape)} without its last dimension), got {tuple(selector.shape)}"
            )
        selected = selector != ignore_index if name == "targets" else selector.to(torch.bool)
        keep &= selected.reshape(-1).to(outputs.device)
    return keep


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and counts are taken in: float64 for float64, else float32 (a float16
    sum or count overflows at 65,504)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_over_kept(total: Tensor, keep: Tensor, count_as_tensor: bool,
                    name: str) -> tuple[Tensor, int] | tuple[Tensor, Tensor]:
    """``(total / B, B)`` with B the kept positions: an int (raising when 0), or a tensor.

    ``total`` is float32 (float64) already; so is the mean, whatever the outputs' dtype."""
    count = keep.sum()
    if count_as_tensor:
        return total / count.clamp(min=1).to(total.dtype), count
    num_samples = int(count)
    if num_samples == 0:
        raise ValueError(f"{name} got no position to sample: every one is masked")
    return total / num_samples, num_samples


def _check_event_dimension(outputs: Tensor, name: str) -> None:
    if outputs.dim() < 2:
        raise ValueError(
            f"{name} reads outputs shaped (..., D), positions first and the D outputs of a "
            f"position last; got shape {tuple(outputs.shape)}. For N scalar outputs pass "
            "outputs.unsqueeze(-1), of shape (N, 1)"
        )
    if not outputs.is_floating_point():
        raise ValueError(f"{name} needs floating-point outputs, got {outputs.dtype}")


def _noise_dtype(outputs: Tensor) -> torch.dtype:
    return _wide(outputs.dtype)


def _checked_variance(variance: float | Tensor, predictions: Tensor) -> float | Tensor:
    """``variance`` if it is a finite σ² > 0 (a number, or a float tensor broadcasting to
    ``predictions``' shape with every entry finite and > 0), detached; else ValueError."""
    if not isinstance(variance, Tensor):
        if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not (
                0 < variance < float("inf")):
            raise ValueError(f"variance must be a finite number > 0 (σ², default 1.0), got "
                             f"{variance!r}")
        return float(variance)
    if not variance.is_floating_point():
        raise ValueError(f"variance must be a float tensor, got {variance.dtype}")
    try:
        shape = torch.broadcast_shapes(variance.shape, predictions.shape)  # type: ignore[no-untyped-call]
    except RuntimeError:
        shape = None
    if shape != predictions.shape:
        raise ValueError(
            f"variance of shape {tuple(variance.shape)} does not broadcast to the predictions' "
            f"shape {tuple(predictions.shape)}; give one σ² per output, e.g. shape "
            f"({predictions.shape[-1]},), or a number"
        )
    variance = variance.detach()
    if not bool(((variance > 0) & variance.isfinite()).all()):  # one host read
        raise ValueError("variance must hold finite values > 0 (σ²); found 0, a negative, "
                         "nan or inf")
    return variance


@overload
def sampled_gaussian_nll(
    predictions: Tensor,
    *,
    variance: float | Tensor = ...,
    mask: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    count_as_tensor: Literal[False] = ...,
) -> tuple[Tensor, int]: ...


@overload
def sampled_gaussian_nll(
    predictions: Tensor,
    *,
    variance: float | Tensor = ...,
    mask: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    count_as_tensor: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def sampled_gaussian_nll(
    predictions: Tensor,
    *,
    variance: float | Tensor = 1.0,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    count_as_tensor: bool = False,
) -> tuple[Tensor, int] | tuple[Tensor, Tensor]:
    """Mean Gaussian negative log-likelihood ½‖f − ŷ‖²/σ² of targets drawn as ŷ ~ N(f, σ²).

    Sophia-G's estimator for regression (MSE) heads: with B·ĝ⊙ĝ, ĝ the gradient of this loss,
    its expectation is the diagonal of the Gauss-Newton matrix of the mean of ½‖f − y‖²/σ²
    over the B positions, (1/B)·Σ_i J_iᵀJ_i/σ², J_i = ∂f_i/∂θ. The mean squared error that a
    model trains with (``F.mse_loss``, a mean over all B·D outputs) has the same Gauss-Newton
    matrix up to the constant factor 2σ²/D, which ρ absorbs.

    Args:
        predictions: ``(..., D)`` model outputs f, any float dtype: positions first, the D
            outputs of one position last (a regression head with one output: ``(N, 1)``).
        variance: σ² of the assumed noise, > 0 (default 1.0): a number, or a float tensor
            whose shape broadcasts against ``predictions``' ``(..., D)`` (e.g. ``(D,)``:
            per-output variances).
        mask: optional ``(...)`` bool tensor shaped like ``predictions[..., 0]``; only
            positions where it is True enter the mean.
        generator: the random source of the draw (on ``predictions``' device); default: global.
            The noise is drawn in float32 (float64 for float64 predictions).
        count_as_tensor: return B as a 0-dim int64 tensor (no wait for the device), and a loss
            of 0 when every position is masked, as in :func:`sampled_cross_entropy` (default
            False: B as a Python int).

    Returns:
        ``(loss, num_samples)`` as :func:`sampled_cross_entropy` gives them: pass B, summed
        over all data-parallel ranks, as ``SophiaG.update_hessian(scale=B)``.
    """
    _check_event_dimension(predictions, "sampled_gaussian_nll")
    wide = _wide(predictions.dtype)
    variance_wide = _checked_variance(variance, predictions)
    if isinstance(variance_wide, Tensor):
        variance_wide = variance_wide.to(wide)
    keep = _kept_positions(predictions, mask=mask)
    flat = predictions.reshape(-1, predictions.shape[-1])
    with torch.no_grad():
        noise = torch.empty(flat.shape, dtype=wide, device=flat.device)
        noise.normal_(generator=generator)
        if isinstance(variance_wide, Tensor):
            variance_wide = variance_wide.expand_as(predictions).reshape(flat.shape)
        residual_draw = noise * variance_wide ** 0.5  # f − ŷ for ŷ = f + σ·noise
    # f − ŷ, kept exact in float32 whatever f's dtype: (f − f) is 0 with gradient 1. Rounding
    # ŷ = f + σ·noise to a bf16/fp16 f would lose the noise once |f| ≫ σ (at |f| = 3000 in
    # bf16 every draw rounds to f and the estimate is 0).
    residual = (flat.to(wide) - flat.detach().to(wide)) - residual_draw
    per_position = (residual.pow(2) / variance_wide).sum(-1) / 2
    total = per_position.masked_fill(~keep, 0).sum()
    return _mean_over_kept(total, keep, count_as_tensor, "sampled_gaussian_nll")


@overload
def sampled_binary_cross_entropy(
    logits: Tensor,
    *,
    mask: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    count_as_tensor: Literal[False] = ...,
) -> tuple[Tensor, int]: ...


@overload
def sampled_binary_cross_entropy(
    logits: Tensor,
    *,
    mask: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    count_as_tensor: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def sampled_binary_cross_entropy(
    logits: Tensor,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    count_as_tensor: bool = False,
) -> tuple[Tensor, int] | tuple[Tensor, Tensor]:
    """Mean binary cross-entropy of ``logits`` against targets drawn as ŷ ~ Bernoulli(σ(f)).

    Sophia-G's estimator for binary and multi-label heads (``BCEWithLogitsLoss``): each of
    the D logits of a position is an independent Bernoulli, and B·ĝ⊙ĝ has as its mean the
    Gauss-Newton diagonal of the mean over positions of Σ_d BCE(f_d, y_d),
    (1/B)·Σ_i J_iᵀ diag(σ(f_i)(1 − σ(f_i))) J_i. A mean over all B·D outputs, as
    ``BCEWithLogitsLoss`` takes it, differs by the constant factor 1/D, which ρ absorbs.

    The draw is ``u < σ(f)`` with u ~ U(0, 1) in float32 (float64 for float64 logits):
    elementwise, no host sync, capturable.

    Args:
        logits: ``(..., D)`` unnormalised scores, any float dtype; a single binary logit per
            position is ``(N, 1)``.
        mask: optional ``(...)`` bool tensor shaped like ``logits[..., 0]``; only positions
            where it is True enter the mean.
        generator: the random source of the draw (on ``logits``' device); default: global.
            The uniforms are drawn in float32 (float64 for float64 logits).
        count_as_tensor: return B as a 0-dim int64 tensor (no wait for the device), and a loss
            of 0 when every position is masked, as in :func:`sampled_cross_entropy` (default
            False: B as a Python int).

    Returns:
        ``(loss, num_samples)``, as :func:`sampled_cross_entropy` gives them.
    """
    _check_event_dimension(logits, "sampled_binary_cross_entropy")
    keep = _kept_positions(logits, mask=mask)
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        uniform = torch.empty(flat.shape, dtype=_noise_dtype(flat), device=flat.device)
        uniform.uniform_(generator=generator)
        targets = (uniform < torch.sigmoid(flat.to(uniform.dtype))).to(flat.dtype)
    per_output = F.binary_cross_entropy_with_logits(flat, targets, reduction="none")
    per_position = per_output.to(_wide(flat.dtype)).sum(-1)
    total = per_position.masked_fill(~keep, 0).sum()
    return _mean_over_kept(total, keep, count_as_tensor, "sampled_binary_cross_entropy")


def _gumbel_max(flat_logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One label per row of ``(N, C)`` logits, drawn from the row's softmax: the index of
    ``max(logits + G)``, G = -log(E) standard Gumbel, E ~ Exp(1) i.i.d. in float32.

    E is floored at float32's smallest normal number: ``exponential_`` may return 0 in
    float32, which would make G infinite and that class certain. The sum is taken in float32,
    or in float64 for float64 logits.
    """
    noise = torch.empty(flat_logits.shape, dtype=torch.float32, device=flat_logits.device)
    noise.exponential_(generator=generator)
    gumbel = noise.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_()
    if flat_logits.dtype == torch.float64:
        gumbel = gumbel.double()
    return gumbel.add_(flat_logits).argmax(dim=-1)


def rademacher_like(tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A tensor shaped and typed like ``tensor`` with i.i.d. entries ±1 (probability ½ each).

    Drawn on the generator's device (``tensor``'s when there is no generator) and moved to
    ``tensor``'s.

    Args:
        tensor: a tensor of any shape and dtype; only its shape, dtype and device are read.
        generator: the random source of the signs (default None: torch's global generator).

    Returns:
        a tensor like ``tensor`` (same shape, dtype and device) holding -1 and +1.
    """
    device = generator.device if generator is not None else tensor.device
    bits = torch.randint(0, 2, tensor.shape, generator=generator, device=device)
    return (bits * 2 - 1).to(device=tensor.device, dtype=tensor.dtype)


_NO_DOUBLE_BACKWARD_HINT = (
    "the loss closure uses an operation with no double backward (most often a fused "
    "scaled_dot_product_attention kernel). SophiaH needs a Hessian-vector product: run the "
    "closure with math attention, e.g. `update_hessian(closure, math_attention=True)` "
    "(the default), or inside `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`."
)


def _math_attention() -> contextlib.AbstractContextManager[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def hutchinson_estimate(
    closure: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    generator: torch.Generator | None = None,
    math_attention: bool = True,
) -> list[Tensor]:
    """One Hutchinson estimate ĥ = u ⊙ (∇²L · u) per parameter, u Rademacher.

    Args:
        closure: recomputes and returns the scalar loss L (without calling backward).
        params: the tensors to differentiate against, each of any shape (the probe u of
            each is shaped like it); ``p.grad`` is left untouched.
        generator: random source of the probes u (one probe per parameter, always drawn,
            so the generator advances the same whatever the loss uses); default None:
            torch's global generator.
        math_attention: run the closure under the math SDPA backend, the only one with a
            double backward on every device (default True). Costs speed on that one
            forward, only.

    Returns:
        a list of tensors shaped like ``params`` (zeros where L does not depend on p).
    """
    estimates = _hutchinson_estimate(
        closure, params, generator=generator, math_attention=math_attention
    )
    return [torch.zeros_like(p) if e is None else e for p, e in zip(params, estimates)]


def _hutchinson_estimate(
    closure: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    generator: torch.Generator | None,
    math_attention: bool,
) -> list[Tensor | None]:
    """``hutchinson_estimate``, with None for the parameters L does not depend on at all."""
    params = list(params)
    context = _math_attention() if math_attention else contextlib.nullcontext()
    with torch.enable_grad(), context:
        loss = closure()
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("the closure must return the loss as a 0-dim tensor")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        probes = [rademacher_like(p, generator) for p in params]
        estimates: list[Tensor | None] = [
            torch.zeros_like(params[i]) if grads[i] is not None else None
            for i in range(len(params))
        ]
        if not used:  # L is at most linear in every parameter: its Hessian is zero
            return estimates
        try:
            hvps = torch.autograd.grad(
                [grads[i] for i in used],
                [params[i] for i in used],
                grad_outputs=[probes[i] for i in used],
                allow_unused=True,
            )
        except RuntimeError as error:
            if "not implemented" in str(error) or "double backward" in str(error).lower():
                raise RuntimeError(_NO_DOUBLE_BACKWARD_HINT) from error
            raise
    for index, hvp in zip(used, hvps):
        if hvp is not None:
            estimates[index] = probes[index] * hvp
    return estimates
