"""Forward-noising calibration trajectory: clean text masked at a ladder of noise levels.

This is the calibration the Sink-Aware Pruning reference code runs (not a generation): for noise
levels t = k/steps, k = sample_interval, 2·sample_interval, …, steps, every token is masked
independently with probability p = (1 − eps)·t + eps, and the model is run once per (batch, level).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnprobe.record import active_recording


def noise_levels(steps: int, sample_interval: int) -> list[float]:
    """The noise levels t of the calibration ladder.

    Example:
        >>> noise_levels(50, 5)[:3], noise_levels(50, 5)[-1]
        ([0.1, 0.2, 0.3], 1.0)
    """
    if steps < 1 or sample_interval < 1 or sample_interval > steps:
        raise ValueError(
            f"need 1 <= sample_interval <= steps, got steps={steps}, sample_interval={sample_interval}"
        )
    return [k / steps for k in range(sample_interval, steps + 1, sample_interval)]


def _protected(shape: torch.Size, keep: Sequence[int] | Tensor | None) -> Tensor:
    protected = torch.zeros(shape, dtype=torch.bool)
    if keep is None:
        return protected
    if isinstance(keep, Tensor) and keep.dtype == torch.bool:
        return protected | keep.cpu().expand(shape)
    positions = torch.as_tensor(list(keep) if not isinstance(keep, Tensor) else keep, dtype=torch.long)
    if positions.numel() and (positions.max() >= shape[1] or positions.min() < -shape[1]):
        raise ValueError(f"keep= positions {positions.tolist()} fall outside sequences of length {shape[1]}")
    protected[:, positions] = True
    return protected


@torch.no_grad()
def calibrate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    mask_token_id: int,
    steps: int = 50,
    sample_interval: int = 5,
    eps: float = 1e-3,
    seed: int = 0,
    batch_size: int = 1,
    keep: Sequence[int] | Tensor | None = None,
    attention_mask: Tensor | None = None,
    progress: bool = True,
) -> int:
    """Run the forward-noising calibration trajectory under the model's active recording.

    Each (batch, noise level) is one recorded step whose metadata holds ``t``, ``p_mask`` and the
    indices of its sequences.

    Args:
        model: a model inside ``with attnprobe.record(model, ...)``.
        input_ids: clean token ids (N, L).
        mask_token_id: the id written at masked positions.
        steps, sample_interval: noise levels t = k/steps for k = sample_interval, 2·sample_interval, …
        eps: the floor of the masking probability, p = (1 − eps)·t + eps.
        seed: seed of the masking draws (drawn on the CPU, so identical on every device).
        batch_size: sequences per forward.
        keep: positions never masked (e.g. ``[0, -1]`` as Dream does), or a bool mask broadcastable
            to (N, L). Padding (``attention_mask == 0``) is never masked either.
        attention_mask: optional padding mask (N, L), passed to the model.
        progress: show a progress bar.

    Returns:
        The number of steps recorded.

    Example:
        >>> with attnprobe.record(model, "runs/calib", linear_stats=True) as store:   # doctest: +SKIP
        ...     attnprobe.calibrate(model, ids, mask_token_id=126336, steps=10, sample_interval=5)
    """
    recording = active_recording(model)
    if recording is None:
        raise RuntimeError(
            "calibrate() records nothing outside a recording: call it inside "
            "`with attnprobe.record(model, path, linear_stats=True):`"
        )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (sequences, tokens), got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    levels = noise_levels(steps, sample_interval)
    generator = torch.Generator().manual_seed(seed)
    protected = _protected(input_ids.shape, keep)
    if attention_mask is not None:
        protected |= attention_mask.cpu() == 0
    starts = range(0, input_ids.shape[0], batch_size)
    bar = tqdm(total=len(starts) * len(levels), desc="calibrate", unit="step", disable=not progress)
    with bar:
        for start in starts:
            rows = slice(start, start + batch_size)
            clean = input_ids[rows]
            for t in levels:
                p_mask = (1 - eps) * t + eps
                masked = (torch.rand(clean.shape, generator=generator) < p_mask) & ~protected[rows]
                noisy = torch.where(masked.to(clean.device), torch.full_like(clean, mask_token_id), clean)
                kwargs = {"input_ids": noisy}
                if attention_mask is not None:
                    kwargs["attention_mask"] = attention_mask[rows]
                with recording.step(
                    t=t, p_mask=p_mask, sequences=list(range(rows.start, rows.start + len(clean)))
                ):
                    model(**kwargs)
                bar.update()
    return len(starts) * len(levels)
