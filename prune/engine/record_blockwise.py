"""Record the calibration store block by block: a dense first pass that never needs the whole model.

``attnprobe.record`` + ``attnprobe.calibrate`` run whole-model forwards. For a model that does not fit
the device, :func:`record_blockwise` computes the same store with the block-wise engine's machinery
(:mod:`prune.engine.blockwise`):

1. the steps are exactly :func:`attnprobe.calibrate`'s (``attnprobe.calibration_steps``: same
   windows, noise levels, seed and batches);
2. the first block's inputs of every step are captured once (the embeddings visit ``device``);
3. block by block (each onloaded to ``device`` in turn, weights unchanged), the block runs over every
   step; :class:`attnprobe.BlockMassRecording` computes the attention mass of its SDPA calls as the
   recorder does, and the block's dense outputs replace the cache on ``offload_device``;
4. the mass is written as an ordinary step-major store (``linear_stats=False``): input ids, padding,
   every layer's mass, each block's per-token cos(input, output) (``block_cos/<block>``, for
   ``pattern="blocks"``; the block's input and output are both at hand) and calibrate's step metadata.

Each block runs once per step, so the pass costs one dense forward's compute and moves each block's
weights to the device once (streaming whole-model forwards, :func:`prune.engine.onload.streamed`, moves them
once per forward). ``prune.apply(..., sequential=True, device=...)`` then prunes from the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnprobe import BlockMassRecording, TrajectoryStore, calibration_steps, token_cosine
from prune.engine.block_cache import check_offload, open_cache
from prune.engine.blockwise import CalibrationStep, capture_inputs, find_blocks
from prune.engine.onload import block_device, onloaded


@torch.no_grad()
def record_blockwise(
    model: nn.Module,
    input_ids: Tensor,
    path: str | Path | None = None,
    *,
    mask_token_id: int,
    steps: int = 50,
    sample_interval: int = 5,
    eps: float = 1e-3,
    seed: int = 0,
    batch_size: int = 1,
    keep: Sequence[int] | Tensor | None = None,
    attention_mask: Tensor | None = None,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> TrajectoryStore:
    """Write the calibration store of ``attnprobe.calibrate`` by running the model one block at a time.

    The store equals (to float tolerance) the one of ``attnprobe.record(model, path,
    linear_stats=False)`` around ``attnprobe.calibrate(model, input_ids, ...)`` with the same
    arguments, and ``prune.apply(..., sequential=True)`` accepts it.

    Args:
        model: the dense model (e.g. on the CPU); its weights are not changed.
        input_ids, mask_token_id, steps, sample_interval, eps, seed, batch_size, keep, attention_mask:
            as in :func:`attnprobe.calibrate`.
        path: store directory (None: a temporary one owned by the returned store).
        device: onload each block (and, for the capture, the embeddings) to this device; None runs
            every block where it lives.
        offload_device: where the cached block outputs live between blocks (model dtype): a torch
            device, or ``"disk"`` for memory-mapped files read back one step at a time
            (:mod:`prune.engine.block_cache`), so host memory does not grow with the number of steps.
        cache_dir: with ``offload_device="disk"``, where the temporary cache directory is made.
        overwrite: replace an existing store at ``path``.
        progress: show a progress bar over the blocks.
        **options: passed to :class:`attnprobe.BlockMassRecording` (``sink_std``, ``sink_alpha``,
            ``candidate_floor_std``, ``max_chunk_bytes``, ``targets``, ``spool_dir``).

    Returns:
        The written :class:`attnprobe.TrajectoryStore`.

    Example (on a GPU pass ``device="cuda:0"``; here the CPU):
        >>> store = prune.record_blockwise(model, ids, "runs/blockwise", mask_token_id=259, steps=4,
        ...                                sample_interval=2, device="cpu", progress=False)
        >>> store.num_steps
        4
        >>> result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True, sequential=True,
        ...                      device="cpu", progress=False)
    """
    planned = list(
        calibration_steps(
            input_ids,
            mask_token_id=mask_token_id,
            steps=steps,
            sample_interval=sample_interval,
            eps=eps,
            seed=seed,
            batch_size=batch_size,
            keep=keep,
            attention_mask=attention_mask,
        )
    )
    # valid exactly as the recorder reads it: the padding mask where one is passed, else None (all valid)
    masks = [kwargs["attention_mask"] != 0 if "attention_mask" in kwargs else None for kwargs, _ in planned]
    ids = [kwargs["input_ids"].detach().cpu() for kwargs, _ in planned]
    full = [m if m is not None else torch.ones(i.shape, dtype=torch.bool) for m, i in zip(masks, ids)]
    cal_steps = [CalibrationStep(i, v.cpu()) for i, v in zip(ids, full)]
    blocks = find_blocks(model, [])
    # Block Influence (attnprobe.recording.block_cosine)
    cosines: list[dict[str, Tensor]] = [{} for _ in cal_steps]
    check_offload(offload_device, cache_dir)
    with (
        BlockMassRecording(model, path, mask_token_id=mask_token_id, overwrite=overwrite, **options) as rec,
        open_cache(offload_device, cache_dir) as cache,
    ):
        with onloaded(model, device, exclude=[block.module for block in blocks], write_back=False):
            capture_inputs(model, blocks[0], cal_steps, device=device, cache=cache)
        for index, block in enumerate(tqdm(blocks, desc="record block-wise", disable=not progress)):
            with onloaded(block.module, device, write_back=False):
                run_device = torch.device(device) if device is not None else block_device(block.module)
                for number, entry in enumerate(cache):
                    with rec.observe(number, masks[number]):
                        output = entry.run(block.module, run_device)
                    hidden = entry.hidden.to(output.device)
                    if hidden.shape == output.shape and hidden.dim() == 3:
                        cosines[number][f"block_cos/{block.name}"] = token_cosine(hidden, output).cpu()
                    del hidden
                    if index + 1 < len(blocks):
                        cache.replace_hidden(number, output)
                    del output
            rec.flush()
        return rec.write_steps([(i, v, meta) for i, v, (_, meta) in zip(ids, full, planned)], cosines)
