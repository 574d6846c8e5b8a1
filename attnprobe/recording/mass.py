"""Attention mass of one ``scaled_dot_product_attention`` call, chunked over queries.

The attention mass of key ``k`` is the attention it receives from every query (arXiv 2602.17664):

    mass[b, h, k] = sum_q softmax_k(scale * q . k + mask)[b, h, q, k]

The reference code materialises the ``(batch, heads, queries, keys)`` probability matrix of every
layer (about 2 GiB per layer and sample at 4,096 tokens). Here queries are processed in chunks whose
score tensor stays under ``max_chunk_bytes``, each chunk is reduced over its queries at once, and only
the ``(batch, heads, keys)`` sum is kept. Nothing reads tensor values back to the host, so the function
can run inside forward hooks on a GPU without synchronising it.

Speed (docs/BENCHMARKS.md): the scores and probabilities of a chunk are the only large tensors. They
are written into two reusable :class:`Workspace` buffers (``bmm(..., out=)``, ``softmax(..., out=)``):
a fresh tensor per layer costs page faults on the CPU (a 32 MiB softmax output took 4x longer than
the softmax itself) and allocator traffic on a GPU. The two buffers together stay under
``max_chunk_bytes``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnprobe.recording.capture import SdpaCall

_FLOAT32_BYTES = 4
# Filling blocked scores with the most negative finite float32 instead of -inf keeps softmax free of
# NaN on fully blocked rows; those rows are then given weight 0 explicitly.
_BLOCKED = torch.finfo(torch.float32).min


class Workspace:
    """A reusable float32 scratch buffer per device for the score chunks of :func:`attention_mass`.

    Owned by whoever calls repeatedly (a recording owns one); never shared between threads. It holds
    at most one chunk (``max_chunk_bytes``) per device.

    Example:
        >>> ws = Workspace()
        >>> ws.take((2, 3), torch.device("cpu")).shape, ws.take((3,), torch.device("cpu")).shape
        (torch.Size([2, 3]), torch.Size([3]))
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, int], Tensor] = {}

    def take(self, shape: tuple[int, ...], device: torch.device, slot: int = 0) -> Tensor:
        """An uninitialised float32 tensor of ``shape`` on ``device``, reusing buffer ``slot`` there."""
        numel = math.prod(shape)
        buffer = self._buffers.get((device, slot))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            self._buffers[(device, slot)] = buffer
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        """Release the buffers."""
        self._buffers.clear()


def _as_4d_mask(attn_mask: Tensor, target: tuple[int, int, int, int]) -> Tensor:
    """View ``attn_mask`` as 4-D and check it broadcasts to ``target`` (batch, heads, queries, keys)."""
    if attn_mask.ndim > 4:
        raise ValueError(
            f"attn_mask has {attn_mask.ndim} dims (shape {tuple(attn_mask.shape)}); it must broadcast to "
            f"(batch, heads, queries, keys) = {target}. Squeeze the extra dimensions."
        )
    mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
    for size, want, name in zip(mask.shape, target, ("batch", "heads", "queries", "keys")):
        if size not in (1, want):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, queries, "
                f"keys) = {target}: its {name} dimension is {size}, expected 1 or {want}."
            )
    return mask


def attention_mass(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    query_valid: Tensor | None = None,
    max_chunk_bytes: int = 32 * 2**20,
    workspace: Workspace | None = None,
) -> Tensor:
    """Attention mass per key of one SDPA call: softmax probabilities summed over queries.

    Takes the arguments of :func:`torch.nn.functional.scaled_dot_product_attention` (the value is not
    needed). Computed in float32 whatever the inputs' dtype, without gradients, ``max_chunk_bytes`` of
    scores at a time (at least one query row), so the full ``(batch, heads, queries, keys)`` matrix is
    never held.

    Masking follows SDPA: a bool ``attn_mask`` is True where a query may attend, a float one is added
    to the scores (``-inf`` blocks). ``is_causal`` lets query ``i`` see keys ``0..i`` (upper-left
    alignment, as SDPA). A query row whose keys are all blocked, or whose ``query_valid`` is False,
    adds nothing.

    Args:
        query: ``(batch, q_heads, queries, head_dim)``.
        key: ``(batch, kv_heads, keys, head_dim)``. With ``kv_heads < q_heads`` and ``q_heads``
            divisible by ``kv_heads`` the call is grouped-query attention (whether or not
            ``enable_gqa`` is set): query head ``h`` uses key head ``h // (q_heads // kv_heads)``.
        attn_mask: bool or float mask broadcastable to ``(batch, q_heads, queries, keys)``.
        is_causal: causal mask with SDPA's upper-left alignment. Cannot be combined with
            ``attn_mask`` (SDPA refuses that too).
        scale: score scale; ``1 / sqrt(head_dim)`` when None.
        enable_gqa: SDPA's flag; accepted for signature parity, grouping is inferred from the shapes.
        query_valid: optional bool ``(batch, queries)``; False rows (padded queries) add nothing.
        max_chunk_bytes: upper bound on the float32 scores and probabilities of one chunk of queries.
        workspace: reuse its buffer for the score chunks (repeated calls, e.g. every layer of a
            recording); None allocates one per call.

    Returns:
        float32 ``(batch, q_heads, keys)`` on the query's device.

    Raises:
        ValueError: If shapes, dtypes or the mask do not match what SDPA accepts.

    Example:
        >>> q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
        >>> m = attention_mass(q, k, enable_gqa=True)
        >>> m.shape, torch.allclose(m.sum(-1), torch.full((1, 4), 6.0))
        (torch.Size([1, 4, 6]), True)
    """
    del enable_gqa  # grouping follows from the shapes, exactly as SDPA maps heads when it is set
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(
            f"query and key must be 4-D (batch, heads, seq, head_dim), got {tuple(query.shape)} and "
            f"{tuple(key.shape)}; unsqueeze a batch dimension for unbatched calls."
        )
    batch, q_heads, queries, head_dim = query.shape
    k_batch, kv_heads, keys, k_dim = key.shape
    if k_batch != batch or k_dim != head_dim:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree on batch and head_dim."
        )
    if kv_heads == 0 or kv_heads > q_heads or q_heads % kv_heads != 0:
        raise ValueError(
            f"key has {kv_heads} heads and query {q_heads}; query heads must be a multiple of key heads "
            "(equal, or grouped-query attention)."
        )
    if not (query.is_floating_point() and key.is_floating_point()):
        raise ValueError(f"query and key must be floating point, got {query.dtype} and {key.dtype}.")
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both (SDPA refuses the combination).")
    if query_valid is not None and (
        query_valid.dtype != torch.bool or tuple(query_valid.shape) != (batch, queries)
    ):
        raise ValueError(
            f"query_valid must be bool (batch, queries) = {(batch, queries)}, got {query_valid.dtype} "
            f"{tuple(query_valid.shape)}; pass the model's attention_mask.bool()."
        )
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}.")

    device = query.device
    groups = q_heads // kv_heads
    if batch * q_heads * queries * keys == 0:
        return torch.zeros(batch, q_heads, keys, dtype=torch.float32, device=device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    with torch.no_grad():
        # Scale folded into the queries once; grouped heads laid out (batch, kv_heads, group, q, d).
        q = (query.detach().to(torch.float32) * scale).view(batch, kv_heads, groups, queries, head_dim)
        # (batch * kv_heads, head_dim, keys): one float32 copy of the key, shared by all chunks
        k_t = key.detach().to(torch.float32).reshape(batch * kv_heads, keys, head_dim).transpose(1, 2)

        # Row weights (batch, q_heads, queries): 0 for padded queries and fully blocked rows.
        mask = None
        blocked = None
        row_weight = None
        if attn_mask is not None:
            mask = _as_4d_mask(attn_mask.to(device), (batch, q_heads, queries, keys))
            if mask.dtype == torch.bool:
                visible = mask.any(dim=-1)  # (b|1, h|1, q|1)
                blocked = ~mask
                mask = None
            else:
                visible = (mask > float("-inf")).any(dim=-1)
                mask = mask.to(torch.float32).clamp(min=_BLOCKED)
            row_weight = visible
        if query_valid is not None:
            qv = query_valid.to(device)[:, None, :]  # (batch, 1, queries)
            row_weight = qv if row_weight is None else row_weight & qv
        if row_weight is not None:
            row_weight = (
                row_weight.expand(batch, q_heads, queries)
                .to(torch.float32)
                .reshape(batch * q_heads, 1, queries)
            )

        rows = max(1, max_chunk_bytes // (2 * batch * q_heads * keys * _FLOAT32_BYTES))  # scores + probs
        rows = min(rows, queries)
        workspace = workspace if workspace is not None else Workspace()
        mass = None
        for start in range(0, queries, rows):
            stop = min(start + rows, queries)
            n = stop - start
            q_chunk = q[:, :, :, start:stop].reshape(batch * kv_heads, groups * n, head_dim)
            scores = workspace.take((batch * kv_heads, groups * n, keys), device)
            torch.bmm(q_chunk, k_t, out=scores)  # (batch * kv_heads, groups * n, keys)
            grouped = scores.view(batch, kv_heads, groups, n, keys)
            if mask is not None:
                grouped.add_(_chunk(mask, start, stop, kv_heads, groups))
            elif blocked is not None:
                grouped.masked_fill_(_chunk(blocked, start, stop, kv_heads, groups), _BLOCKED)
            elif is_causal:
                # query i (absolute index start + row) sees keys 0..i
                future = torch.ones(n, keys, dtype=torch.bool, device=device).triu_(start + 1)
                grouped.masked_fill_(future, _BLOCKED)
            probs = workspace.take((batch * q_heads, n, keys), device, slot=1)
            torch.softmax(scores.view(batch * q_heads, n, keys), dim=-1, out=probs)
            if row_weight is None:
                part = probs.sum(dim=1)
                mass = part if mass is None else mass.add_(part)
            else:  # fully blocked rows (uniform after softmax of _BLOCKED) and padded queries weigh 0
                w = row_weight[:, :, start:stop]  # (batch * q_heads, 1, n)
                mass = torch.bmm(w, probs) if mass is None else mass.baddbmm_(w, probs)
        return mass.reshape(batch, q_heads, keys)


def sdpa_call_mass(
    call: SdpaCall,
    valid: Tensor | None,
    *,
    max_chunk_bytes: int = 32 * 2**20,
    workspace: Workspace | None = None,
) -> Tensor:
    """Attention mass ``(batch, heads, keys)`` of one SDPA call, with the recorder's padding rule.

    ``valid`` (bool ``(batch, tokens)``, False on padding, or None) masks the queries when it matches
    their grid, and zeroes the mass of padding keys when it matches the keys' grid, even if the model
    let queries attend to them.
    """
    batch, _, queries, _ = call.query.shape
    keys = call.key.shape[-2]
    query_valid = valid if valid is not None and tuple(valid.shape) == (batch, queries) else None
    if query_valid is not None:
        query_valid = query_valid.to(call.query.device)
    mass = attention_mass(
        call.query,
        call.key,
        call.attn_mask,
        is_causal=call.is_causal,
        scale=call.scale,
        enable_gqa=call.enable_gqa,
        query_valid=query_valid,
        max_chunk_bytes=max_chunk_bytes,
        workspace=workspace,
    )
    if valid is not None and tuple(valid.shape) == (batch, keys):
        mass = mass * valid.to(mass.device)[:, None, :]
    return mass


def _chunk(mask: Tensor, start: int, stop: int, kv_heads: int, groups: int) -> Tensor:
    """Query rows ``start:stop`` of a 4-D broadcastable mask, heads split as (kv_heads, group)."""
    if mask.shape[2] != 1:
        mask = mask[:, :, start:stop]
    b, h, q, k = mask.shape
    if h == 1:
        return mask.view(b, 1, 1, q, k)
    return mask.view(b, kv_heads, groups, q, k)
