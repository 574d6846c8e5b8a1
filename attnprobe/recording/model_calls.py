"""What a top-level call of a recorded model tells about its step: input ids, padding and shape."""

from __future__ import annotations

from torch import Tensor


def token_grid(args: tuple, kwargs: dict) -> tuple[Tensor | None, Tensor | None, int | None, int | None]:
    """``input_ids``, padding mask and (batch, tokens) of a top-level call, where they can be read."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
        input_ids = args[0]
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor) and args[1].dim() == 2:
        mask = args[1]
    embeds = kwargs.get("inputs_embeds")
    shape = None
    if isinstance(input_ids, Tensor) and input_ids.dim() == 2:
        shape = tuple(input_ids.shape)
    elif isinstance(embeds, Tensor) and embeds.dim() == 3:
        shape = tuple(embeds.shape[:2])
    valid = None
    if isinstance(mask, Tensor) and mask.dim() == 2 and (shape is None or tuple(mask.shape) == shape):
        valid = mask != 0
        shape = tuple(mask.shape)
    ids = input_ids.detach() if isinstance(input_ids, Tensor) and input_ids.dim() == 2 else None
    batch, tokens = shape if shape is not None else (None, None)
    return ids, valid, batch, tokens
