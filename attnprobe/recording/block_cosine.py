"""Per-token cosine between each block's input and output hidden state (for Block Influence).

ShortGPT (arXiv 2403.03853) scores a block by how little it turns the residual stream:
``BI_b = 1 − mean over tokens of cos(h_b, h_{b+1})``, with ``h_b`` block b's input and ``h_{b+1}`` its
output. A diffusion LM runs every block once per denoising step, so the recorder keeps that cosine for
every step, block, sample and token: ``block_cos/<block name>`` (batch, tokens) float32 in the step
file. That is one float per token and block, ``heads`` times less than the attention mass the step
already stores, and it keeps every weighting open: ``prune`` averages it plainly or with any sink
weights (:mod:`prune.engine.block_influence`) without running the model again.

:class:`BlockCosineHooks` is the part of :class:`attnprobe.recording.record.Recording` that attaches the block
hooks: a pre-hook holds a reference to the block's input (the residual stream, alive anyway) and the
post-hook reduces it against the output at once, so nothing is held past the block.
:class:`CosineProbe` is the same measurement without a recording, for re-measuring a pruned model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows of (batch · tokens) converted to float32 at once: bounds the temporaries of a bf16 stream.
_ROWS_PER_CHUNK = 4096


def token_cosine(x_in: Tensor, x_out: Tensor) -> Tensor:
    """``cos(x_in[b, t], x_out[b, t])`` per token, in float32, a chunk of rows at a time.

    Args:
        x_in, x_out: (batch, tokens, hidden) of any float dtype, the same shape.

    Returns:
        float32 (batch, tokens) on the inputs' device (0 where a vector is all zeros).

    Example:
        >>> token_cosine(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 1.0]]])).tolist()
        [[0.7071067690849304]]
    """
    batch, tokens, hidden = x_in.shape
    a, b = x_in.reshape(-1, hidden), x_out.reshape(-1, hidden)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    for r0 in range(0, a.shape[0], _ROWS_PER_CHUNK):
        part = slice(r0, r0 + _ROWS_PER_CHUNK)
        out[part] = F.cosine_similarity(a[part].float(), b[part].float(), dim=-1, eps=1e-12)
    return out.view(batch, tokens)


def hidden_of(args: tuple, kwargs: dict) -> Tensor | None:
    """A block's input hidden state: its first positional tensor or ``hidden_states=``."""
    if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
        return args[0]
    hidden = kwargs.get("hidden_states", kwargs.get("x"))
    return hidden if isinstance(hidden, Tensor) and hidden.is_floating_point() else None


def output_of(output) -> Tensor | None:
    """A block's output hidden state: the tensor it returns, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def attach_cosine_hooks(
    modules: dict[str, nn.Module], blocks: list[str], sink: Callable[[str, Tensor, Tensor], None]
) -> list:
    """Hook each block so that ``sink(name, input, output)`` runs when it returns; returns the handles."""
    held: dict[str, Tensor] = {}
    handles = []
    for name in blocks:

        def before(module, args, kwargs, name=name):
            hidden = hidden_of(args, kwargs)
            if hidden is not None:
                held[name] = hidden.detach()

        def after(module, args, kwargs, output, name=name):
            hidden = held.pop(name, None)
            out = output_of(output)
            if hidden is not None and out is not None and out.shape == hidden.shape and hidden.dim() == 3:
                sink(name, hidden, out.detach())

        handles.append(modules[name].register_forward_pre_hook(before, with_kwargs=True))
        handles.append(modules[name].register_forward_hook(after, with_kwargs=True, always_call=True))
    return handles


class BlockCosineHooks:
    """Block hooks of a recording, mixed into :class:`attnprobe.recording.record.Recording`.

    Reads the recording's ``layout``, ``_forward``, ``_replay`` and ``_other_thread``; writes
    ``forward.block_cos[block] = (batch, tokens)`` float32, which :mod:`attnprobe.recording.step_reduce`
    stacks
    into the step file.
    """

    def _attach_block_hooks(self, modules: dict[str, nn.Module]) -> list:
        blocks = sorted({b for b in self.layout.blocks.values() if b}, key=list(modules).index)
        return attach_cosine_hooks(modules, blocks, self._on_block)

    def _on_block(self, name: str, hidden: Tensor, out: Tensor) -> None:
        if self._other_thread() or self._replay is not None:  # a two-pass replay measured it already
            return
        forward = self._forward
        if forward is None or tuple(hidden.shape[:2]) != (forward.batch, forward.tokens):
            return
        if name not in forward.block_cos:  # a block called twice in one forward: its first call counts
            forward.block_cos[name] = token_cosine(hidden, out)


class CosineProbe:
    """Per-token block cosines of plain forwards, outside a recording (re-measuring a pruned model).

    Example:
        >>> with CosineProbe(model, ["model.layers.0"]) as probe:     # doctest: +SKIP
        ...     model(input_ids=ids)
        >>> probe.cos["model.layers.0"][0].shape                        # doctest: +SKIP
        torch.Size([8, 128])
    """

    def __init__(self, model: nn.Module, blocks: list[str]) -> None:
        self.model = model
        self.blocks = blocks
        self.cos: dict[str, list[Tensor]] = {name: [] for name in blocks}
        self._handles: list = []

    def __enter__(self) -> CosineProbe:
        modules = dict(self.model.named_modules())
        self._handles = attach_cosine_hooks(modules, self.blocks, self._on_block)
        return self

    def _on_block(self, name: str, hidden: Tensor, out: Tensor) -> None:
        self.cos[name].append(token_cosine(hidden, out))

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()
