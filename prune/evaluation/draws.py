"""The Monte-Carlo pieces of the masked-diffusion estimators, shared by :func:`prune.evaluate` and the
lm-eval model: noisy draws of one sequence, the model's logits, and the cross-entropy on masked positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["diffusion_draws", "forward_logits", "masked_ce"]


def forward_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Run ``model(input_ids=ids)`` and return its (B, L, V) logits: ``.logits``, a raw tensor, or the
    first item of a tuple."""
    output = model(input_ids=ids)
    if isinstance(output, Tensor):
        logits = output
    elif isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    else:
        raise ValueError(
            f"cannot find logits in the model output of type {type(output).__name__}; the model must "
            "return a tensor, an object with `.logits`, or a tuple whose first item is the logits."
        )
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)} for input_ids of shape "
            f"{tuple(ids.shape)}; it must return (batch, length, vocab)."
        )
    return logits


def diffusion_draws(
    ids: Tensor, *, estimator: str, mask_token_id: int, start: int, num_samples: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy copies of one sequence for the diffusion estimators.

    Args:
        ids: (L,) token ids on the CPU.
        estimator: ``"mdlm"`` or ``"llada"``.
        mask_token_id: id written at masked positions.
        start: first maskable position (positions before it are the prompt).
        num_samples: number of draws D.
        gen: CPU generator the draws come from.

    Returns:
        ``noisy`` (D, L) ids, ``masked`` (D, L) bool, and ``weight`` (D,) float64 such that a draw scores
        ``weight · Σ_masked CE``.
    """
    length = ids.shape[0]
    answer = length - start
    # stratified over draws: draw d uses (d + u_d) / D with u_d ~ U[0, 1)
    index = torch.arange(num_samples, dtype=torch.float64)
    u = torch.rand(num_samples, generator=gen, dtype=torch.float64)
    masked = torch.zeros(num_samples, length, dtype=torch.bool)
    if estimator == "mdlm":
        t = (index + 1.0 - u) / num_samples  # (D,) in (0, 1]; draw d in (d/D, (d+1)/D]
        masked[:, start:] = torch.rand(num_samples, answer, generator=gen, dtype=torch.float64) < t[:, None]
        weight = 1.0 / (t * answer)
    else:  # llada
        k = ((index + u) / num_samples * answer).floor().long().clamp_max(answer - 1) + 1  # (D,) U{1..answer}
        ranks = torch.rand(num_samples, answer, generator=gen).argsort(dim=1).argsort(dim=1)
        masked[:, start:] = ranks < k[:, None]
        weight = 1.0 / k.double()  # Σ CE / (k / answer) / answer
    noisy = torch.where(masked, torch.full_like(ids, mask_token_id)[None], ids[None])
    return noisy, masked, weight


def masked_ce(model: nn.Module, noisy: Tensor, targets: Tensor, masked: Tensor, shift_logits: bool) -> Tensor:
    """Per-row sum of float32 cross-entropy over the masked positions; (B,) float64."""
    logits = forward_logits(model, noisy)  # (B, L, V)
    if shift_logits:  # Dream: logits at i - 1 predict token i
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    rows, cols = masked.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows, cols].float(), targets[rows, cols], reduction="none")
    sums = torch.zeros(noisy.shape[0], dtype=torch.float64, device=ce.device)
    return sums.index_add_(0, rows, ce.double())
