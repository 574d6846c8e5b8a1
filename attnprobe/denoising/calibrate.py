"""Forward-noising calibration trajectory: clean text masked at a ladder of noise levels.

This is the calibration the Sink-Aware Pruning reference code runs (not a generation): for noise
levels t = k/steps, k = sample_interval, 2·sample_interval, …, steps, every token is masked
independently with probability p = (1 − eps)·t + eps, and the model is run once per (batch, level).

Noise is per window: window i's uniform draws (one per level and token) come from a generator seeded
with :func:`window_seed` ``(seed, i)``, so a window is noised the same whatever the batch size, the
other windows, or the rank that runs it. In a process group recording into a sharded store, rank r
runs the r-th contiguous share of the batches (:func:`attnprobe.distributed.shard_range`), so the
ranks together record exactly the steps one process records, and reading the shards rank after rank
gives them in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnprobe import distributed
from attnprobe.recording.record import active_recording

_MASK64 = (1 << 64) - 1


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


def window_seed(seed: int, window: int) -> int:
    """The seed of window ``window``'s noise: output ``window + 1`` of SplitMix64 seeded with ``seed``, >> 1.

    A fixed, published mix (not Python's ``hash``), so the noise is the same on every platform; the
    shift keeps it below 2**63 for ``torch.Generator.manual_seed``.

    Example:
        >>> hex(window_seed(0, 0) << 1)  # SplitMix64's first output from state 0
        '0xe220a8397b1dcdae'
    """
    z = (seed + (window + 1) * 0x9E3779B97F4A7C15) & _MASK64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _window_noise(windows: range, levels: int, tokens: int, seed: int) -> Tensor:
    """Uniform draws (windows, levels, tokens), float32 on the CPU, each window from its own seed."""
    out = torch.empty(len(windows), levels, tokens)
    for row, window in enumerate(windows):
        generator = torch.Generator().manual_seed(window_seed(seed, window))
        torch.rand((levels, tokens), generator=generator, out=out[row])
    return out


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
        seed: seed of the masking draws (drawn on the CPU, so identical on every device); window i
            draws from its own generator seeded with ``window_seed(seed, i)``.
        batch_size: sequences per forward.
        keep: positions never masked (e.g. ``[0, -1]`` as Dream does), or a bool mask broadcastable
            to (N, L). Padding (``attention_mask == 0``) is never masked either.
        attention_mask: optional padding mask (N, L), passed to the model.
        progress: show a progress bar.

    In a process group (``torch.distributed`` initialized) recording into a sharded store
    (``record(model, path)`` with a path every rank sees), pass the same ``input_ids`` and options on
    every rank: rank r runs the r-th contiguous share of the batches, so every window runs once.

    Returns:
        The number of steps this process recorded.

    Example:
        >>> with attnprobe.record(model, "runs/calib2") as store:
        ...     n = attnprobe.calibrate(model, ids, mask_token_id=259, steps=10, sample_interval=5,
        ...                             progress=False)
        >>> store.num_steps  # 2 windows x 2 noise levels, one window per forward
        4
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
    protected = _protected(input_ids.shape, keep)
    if attention_mask is not None:
        protected |= attention_mask.cpu() == 0
    starts = range(0, input_ids.shape[0], batch_size)
    if _sharded(recording):
        # The split is only right if every rank splits the same work.
        shape = tuple(input_ids.shape)
        summary = (shape, _checksum(input_ids), steps, sample_interval, eps, seed, batch_size)
        distributed.check_agreement(
            summary,
            "calibrate()'s (shape, ids checksum, steps, sample_interval, eps, seed, batch_size)",
            "Pass the same input_ids and options on every rank; calibrate() splits them across ranks.",
        )
        share = distributed.shard_range(len(starts))
        starts = starts[share.start : share.stop]
    bar = tqdm(total=len(starts) * len(levels), desc="calibrate", unit="step", disable=not progress)
    with bar:
        for kwargs, meta in _noised_batches(
            input_ids, starts, batch_size, levels, mask_token_id, eps, seed, protected, attention_mask
        ):
            with recording.step(**meta):
                model(**kwargs)
            bar.update()
    return len(starts) * len(levels)


def _noised_batches(
    input_ids: Tensor,
    starts: Sequence[int],
    batch_size: int,
    levels: list[float],
    mask_token_id: int,
    eps: float,
    seed: int,
    protected: Tensor,
    attention_mask: Tensor | None,
) -> Iterator[tuple[dict[str, Tensor], dict[str, Any]]]:
    """(model keyword arguments, step metadata) of each (batch, noise level), batch-major."""
    for start in starts:
        rows = slice(start, start + batch_size)
        clean = input_ids[rows]
        noise = _window_noise(range(start, start + len(clean)), len(levels), clean.shape[1], seed)
        for level, t in enumerate(levels):
            p_mask = (1 - eps) * t + eps
            masked = (noise[:, level] < p_mask) & ~protected[rows]
            noisy = torch.where(masked.to(clean.device), torch.full_like(clean, mask_token_id), clean)
            kwargs = {"input_ids": noisy}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask[rows]
            yield kwargs, {"t": t, "p_mask": p_mask, "sequences": list(range(start, start + len(clean)))}


def calibration_steps(
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
) -> Iterator[tuple[dict[str, Tensor], dict[str, Any]]]:
    """The forwards :func:`calibrate` runs, without running them: ``(model kwargs, step metadata)``.

    Same arguments and order as :func:`calibrate` on one process (every batch, no sharding), so a
    driver that runs the model its own way (block by block, ``prune.record_blockwise``) records the
    very same steps. The metadata is what :func:`calibrate` stores with each step (``t``, ``p_mask``,
    ``sequences``).

    Example:
        >>> ids = torch.arange(8).view(2, 4)
        >>> [meta["t"] for _, meta in calibration_steps(ids, mask_token_id=0, steps=4, sample_interval=2)]
        [0.5, 1.0, 0.5, 1.0]
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (sequences, tokens), got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    levels = noise_levels(steps, sample_interval)
    protected = _protected(input_ids.shape, keep)
    if attention_mask is not None:
        protected |= attention_mask.cpu() == 0
    starts = range(0, input_ids.shape[0], batch_size)
    yield from _noised_batches(
        input_ids, starts, batch_size, levels, mask_token_id, eps, seed, protected, attention_mask
    )


def _sharded(recording) -> bool:
    """Whether this process writes one shard of a process group's store (then windows are split)."""
    from attnprobe.store.shards import ShardedStore

    return distributed.world_size() > 1 and isinstance(recording.store, ShardedStore)


def _checksum(ids: Tensor) -> int:
    """A cheap position-sensitive checksum of the ids, to check that every rank was given the same."""
    flat = ids.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device) % 65521
    return int((flat * weights).sum())
