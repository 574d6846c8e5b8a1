"""``prune.evaluate``: held-out negative log-likelihood of diffusion and autoregressive LMs.

Three estimators, all reported in nats per scored token:

- ``"mdlm"``: the masked-diffusion bound (MDLM / LLaDA training objective). Per draw, a noise level
  t ~ U(0, 1] is drawn, every non-prompt token is masked with probability t, and the draw scores
  ``Σ_masked CE / t`` divided by the number of non-prompt tokens. The t of a sequence's draws are
  stratified: draw d of D takes t from (d/D, (d+1)/D], which keeps the estimate unbiased and lowers its
  variance. A draw that masks nothing scores exactly 0 (the empty sum) and skips the forward pass; it
  is *not* forced to mask one token, because with the 1/t weight that would make the expectation
  diverge (the chance of masking nothing tends to 1 as t → 0, while the weight grows as 1/t).
- ``"llada"``: LLaDA's conditional estimator. The first ``prompt_length`` tokens are never masked;
  per draw, k ~ U{1..L_answer} answer tokens (chosen uniformly) are masked and the draw scores
  ``Σ_masked CE / (k / L_answer)`` divided by L_answer, i.e. the mean CE of the masked tokens. The
  k of a sequence's draws are stratified over {1..L_answer} in the same way. Its per-draw weight is
  bounded, so it has far lower variance than ``"mdlm"``.
- ``"ar"``: next-token NLL of a causal model, every token after the prompt (and after position 0).

Both diffusion estimators are unbiased Monte-Carlo estimates of the same masked-diffusion bound (an
upper bound on the true NLL); they differ in variance. Masks come from a CPU ``torch.Generator``
seeded with ``seed``, drawn sequence by sequence, so results do not depend on ``batch_size`` or the
device. ``stderr`` is the standard error of the mean over sequences (NaN for one sequence); it includes
the Monte-Carlo noise of the draws.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from prune.evaluation.draws import diffusion_draws, forward_logits, masked_ce

ESTIMATORS = ("mdlm", "llada", "ar")


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        nll: mean negative log-likelihood (or its masked-diffusion bound) in nats per scored token.
        stderr: standard error of ``nll`` over sequences (NaN when only one sequence was given).
        num_tokens: number of scored tokens (non-prompt tokens over all sequences).
        estimator: ``"mdlm"``, ``"llada"`` or ``"ar"``.
        num_samples: Monte-Carlo draws per sequence (1 for ``"ar"``).
        per_sample: (N,) float64 per-sequence estimates, in nats per token.
    """

    nll: float
    stderr: float
    num_tokens: int
    estimator: str
    num_samples: int
    per_sample: Tensor

    @property
    def perplexity(self) -> float:
        """``exp(nll)`` (an upper bound for the diffusion estimators)."""
        return math.exp(self.nll)


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _default_estimator(config: object, mask_token_id: int | None) -> str:
    if getattr(config, "is_causal", None) is True or mask_token_id is None:
        return "ar"
    return "mdlm"


def _rows(
    input_ids: Tensor, *, estimator: str, mask_token_id: int, start: int, num_samples: int, seed: int
) -> Iterator[tuple[int, Tensor, Tensor, float]]:
    """Yield ``(sequence index, noisy ids (L,), masked (L,), weight)`` per draw, sequence by sequence."""
    gen = torch.Generator().manual_seed(seed)
    for n, ids in enumerate(input_ids.cpu()):
        noisy, masked, weight = diffusion_draws(
            ids,
            estimator=estimator,
            mask_token_id=mask_token_id,
            start=start,
            num_samples=num_samples,
            gen=gen,
        )
        for d in range(num_samples):
            yield n, noisy[d], masked[d], float(weight[d])


def _diffusion_nll(
    model: nn.Module,
    input_ids: Tensor,
    *,
    estimator: str,
    mask_token_id: int,
    start: int,
    num_samples: int,
    batch_size: int,
    seed: int,
    shift_logits: bool,
    progress: bool,
) -> Tensor:
    """(N,) float64 per-sequence estimates for ``"mdlm"`` / ``"llada"``."""
    device = _device(model)
    num = input_ids.shape[0]
    totals = torch.zeros(num, dtype=torch.float64)
    batch: list[tuple[int, Tensor, Tensor, float]] = []
    bar = tqdm(total=num * num_samples, desc=f"evaluate[{estimator}]", unit="draw", disable=not progress)

    def flush() -> None:
        owners = torch.tensor([row[0] for row in batch])
        noisy = torch.stack([row[1] for row in batch]).to(device)
        masked = torch.stack([row[2] for row in batch]).to(device)
        weight = torch.tensor([row[3] for row in batch], dtype=torch.float64)
        ce = masked_ce(model, noisy, input_ids[owners].to(device), masked, shift_logits).cpu()
        totals.index_add_(0, owners, ce * weight)
        bar.update(len(batch))
        batch.clear()

    try:
        rows = _rows(
            input_ids,
            estimator=estimator,
            mask_token_id=mask_token_id,
            start=start,
            num_samples=num_samples,
            seed=seed,
        )
        for row in rows:
            if not row[2].any():  # the empty sum: this draw scores exactly 0, no forward needed
                bar.update(1)
                continue
            batch.append(row)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()
    return totals / num_samples


def _ar_nll(model: nn.Module, input_ids: Tensor, *, start: int, batch_size: int, progress: bool) -> Tensor:
    """(N,) float64 per-sequence mean next-token NLL of tokens ``start..L-1``."""
    device = _device(model)
    out = []
    chunks = range(0, input_ids.shape[0], batch_size)
    for first in tqdm(chunks, desc="evaluate[ar]", unit="batch", disable=not progress):
        ids = input_ids[first : first + batch_size].to(device)
        logits = forward_logits(model, ids)  # (B, L, V)
        pred = logits[:, start - 1 : -1].float()  # position i - 1 predicts token i
        ce = F.cross_entropy(pred.transpose(1, 2), ids[:, start:], reduction="none")  # (B, L - start)
        out.append(ce.double().mean(dim=1).cpu())
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    mask_token_id: int | None = None,
    num_samples: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    estimator: str | None = None,
    prompt_length: int = 0,
    shift_logits: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Held-out NLL in nats per token: masked-diffusion bound (``"mdlm"``, ``"llada"``) or AR (``"ar"``).

    Runs under ``torch.no_grad()`` with the model in eval mode (its mode is restored afterwards), on the
    device of the model's parameters. Works on dense and pruned models alike. See the module docstring
    for the estimators.

    Args:
        model: a module called as ``model(input_ids=ids)`` that returns logits (B, L, V), raw or as
            ``.logits``.
        input_ids: (N, L) integer token ids, one held-out window per row, no padding.
        mask_token_id: id of the mask token; defaults to ``model.config.mask_token_id`` when present.
        num_samples: Monte-Carlo draws per sequence (diffusion estimators; ignored by ``"ar"``).
        batch_size: rows per forward pass.
        seed: seed of the CPU generator that draws noise levels and masks.
        estimator: ``"mdlm"``, ``"llada"`` or ``"ar"``; by default ``"ar"`` for causal models (config
            ``is_causal`` True, or no mask token) and ``"mdlm"`` otherwise.
        prompt_length: leading tokens of every row that are context only: never masked, never scored.
        shift_logits: the model's logits at position i - 1 predict token i (Dream); position 0 is then
            never masked. Ignored by ``"ar"``, which always shifts.
        progress: show a tqdm progress bar.

    Returns:
        An :class:`EvalResult`.

    Raises:
        ValueError: on a bad argument: 1-D or non-integer ``input_ids``, unknown estimator, no mask
            token for a diffusion estimator, ``prompt_length`` that leaves nothing to score,
            non-positive ``num_samples`` or ``batch_size``.

    Example:
        >>> result = prune.evaluate(model, ids, mask_token_id=259, num_samples=4, progress=False)
        >>> 0 < result.nll < 10  # nats per masked token of the held-out windows ``ids``
        True
        >>> llada = prune.evaluate(model, ids, mask_token_id=259, estimator="llada", prompt_length=16,
        ...                        num_samples=4, progress=False)
    """
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(
            f"input_ids must be a 2-D (N, L) tensor of token ids, got {shape}; for one sequence pass "
            "input_ids[None]."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; use .long().")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has no rows; pass at least one (N ≥ 1) sequence.")
    config = getattr(model, "config", None)
    if mask_token_id is None:
        mask_token_id = getattr(config, "mask_token_id", None)
    if estimator is None:
        estimator = _default_estimator(config, mask_token_id)
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {estimator!r}; choose one of {', '.join(map(repr, ESTIMATORS))}."
        )
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be ≥ 1, got num_samples={num_samples}, batch_size={batch_size}."
        )
    length = input_ids.shape[1]
    if not 0 <= prompt_length < length:
        raise ValueError(
            f"prompt_length={prompt_length} must be in [0, sequence length {length}), or nothing is "
            "scored; use a smaller prompt_length or longer sequences."
        )
    if estimator == "ar":
        start = max(prompt_length, 1)  # token 0 has no prediction
        if start >= length:
            raise ValueError(f"the ar estimator needs sequences of at least 2 tokens, got length {length}.")
        if getattr(config, "is_causal", None) is False:
            warnings.warn(
                "estimator 'ar' on a model whose config says is_causal=False: it sees the tokens it "
                "predicts, so the NLL is meaningless. Use estimator='mdlm' or 'llada'.",
                stacklevel=2,
            )
    else:
        if mask_token_id is None:
            raise ValueError(
                f"estimator {estimator!r} needs a mask token: pass mask_token_id=... (e.g. 126336 for LLaDA, "
                "151666 for Dream), or use estimator='ar' for a causal model."
            )
        start = max(prompt_length, 1) if shift_logits else prompt_length
        if start >= length:
            raise ValueError(
                f"with shift_logits=True position 0 cannot be scored, and length {length} leaves nothing "
                "else; use longer sequences."
            )
        if (input_ids[:, start:] == mask_token_id).any():
            warnings.warn(
                f"input_ids already contain the mask token {mask_token_id}; those positions are scored as "
                "ordinary tokens. Check mask_token_id or clean the data.",
                stacklevel=2,
            )
        if getattr(config, "is_causal", None) is True:
            warnings.warn(
                f"estimator {estimator!r} on a model whose config says is_causal=True: a causal model cannot "
                "see the masked context to its right. Use estimator='ar'.",
                stacklevel=2,
            )

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if estimator == "ar":
                per_sample = _ar_nll(model, input_ids, start=start, batch_size=batch_size, progress=progress)
                draws = 1
            else:
                per_sample = _diffusion_nll(
                    model,
                    input_ids,
                    estimator=estimator,
                    mask_token_id=int(mask_token_id),
                    start=start,
                    num_samples=num_samples,
                    batch_size=batch_size,
                    seed=seed,
                    shift_logits=shift_logits,
                    progress=progress,
                )
                draws = num_samples
    finally:
        model.train(was_training)

    num = per_sample.shape[0]
    stderr = float(per_sample.std(unbiased=True) / math.sqrt(num)) if num > 1 else float("nan")
    return EvalResult(
        nll=float(per_sample.mean()),
        stderr=stderr,
        num_tokens=num * (length - start),
        estimator=estimator,
        num_samples=draws,
        per_sample=per_sample,
    )
