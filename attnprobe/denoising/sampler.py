"""LLaDA-style generation for any mask predictor.

The answer region starts fully masked and is filled in ``steps`` denoising steps (one full-sequence
forward each, no cache). It is split into semi-autoregressive blocks of ``block_length``; the steps are
split evenly over the blocks. Within a block, the number of tokens revealed per step is the block's
masked count spread evenly over its steps (the remainder going to the first steps). At each step every
masked position gets a candidate token (argmax of the logits, or of Gumbel-perturbed logits when
``temperature > 0``, the noise drawn in float64) and a confidence: the softmax probability of the
candidate (``"low_confidence"`` remasking: the least confident stay masked) or a uniform draw
(``"random"``). Positions outside the current block get confidence -inf and already revealed positions
are never changed. This follows the public ``generate()`` of LLaDA (arXiv 2502.09992), except that mask
tokens inside the prompt are left alone (LLaDA would fill them too) and the mask token is never
proposed as a candidate (its logit is set to -inf), so every generated position holds a real token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

REMASKING = ("low_confidence", "random")


def _logits_of(output: Any) -> Tensor:
    """Accept a model output with ``.logits`` (transformers) or a bare logits tensor."""
    logits = output.logits if hasattr(output, "logits") else output
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise TypeError(
            "the model must return logits of shape (batch, length, vocab), either as a tensor or as "
            f"`.logits`; got {type(output).__name__}. Wrap the model in a callable that returns them."
        )
    return logits


def transfer_schedule(masked_count: Tensor, steps: int) -> Tensor:
    """How many tokens to reveal at each step: ``masked_count`` spread evenly, remainder first.

    Args:
        masked_count: ``(batch,)`` number of masked positions in the block per sample.
        steps: Steps given to the block.

    Returns:
        ``(batch, steps)`` int64 counts summing to ``masked_count`` along dim 1.
    """
    base = masked_count[:, None] // steps
    remainder = masked_count[:, None] % steps
    return base + (torch.arange(steps, device=masked_count.device)[None, :] < remainder).long()


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """float64 uniform draws on ``device``, drawn where the generator lives (a CPU generator with CUDA
    logits draws on the CPU, so a seed gives the same samples on every device)."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float64).to(device)


def _candidates(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Argmax token, with Gumbel-max sampling (noise in float64) when ``temperature > 0``."""
    if temperature == 0:
        return logits.argmax(-1)
    # Gumbel-max: argmax(l / T + g) with g = -log(-log u) samples softmax(l / T). float64 keeps the
    # noise from collapsing ties in low-precision logits, as in LLaDA's add_gumbel_noise.
    u = _uniform(logits.shape, generator, logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def _validate(
    prompt_ids: Tensor, steps: int, gen_length: int, block_length: int, temperature: float, remasking: str
) -> int:
    """Check the arguments and return the number of blocks."""
    if prompt_ids.ndim != 2 or prompt_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"prompt_ids must be an integer tensor of shape (batch, prompt_length); got dtype "
            f"{prompt_ids.dtype} and shape {tuple(prompt_ids.shape)}. Use ids[None] for a single prompt."
        )
    if gen_length <= 0 or steps <= 0 or block_length <= 0:
        raise ValueError(
            f"gen_length ({gen_length}), steps ({steps}) and block_length ({block_length}) must be positive."
        )
    if gen_length % block_length:
        raise ValueError(
            f"gen_length {gen_length} is not divisible by block_length {block_length}; choose a "
            "block_length that divides gen_length (or leave it None for a single block)."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps {steps} is not divisible by the number of blocks {num_blocks} (gen_length / "
            "block_length); use a multiple of it so every block gets the same number of steps."
        )
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; choose one of {REMASKING}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}.")
    return num_blocks


@torch.no_grad()
def generate(
    model: Callable[..., Any],
    prompt_ids: Tensor,
    *,
    mask_token_id: int,
    steps: int = 64,
    gen_length: int = 64,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Fill ``gen_length`` masked positions after each prompt by iterative unmasking.

    Args:
        model: Mask predictor called as ``model(ids)`` (or ``model(ids, attention_mask=...)``),
            returning logits ``(batch, length, vocab)`` or an object with ``.logits``.
        prompt_ids: ``(batch, prompt_length)`` token ids.
        mask_token_id: Id of the mask token.
        steps: Total denoising steps (forwards); must be divisible by the number of blocks.
        gen_length: Number of tokens to generate.
        block_length: Semi-autoregressive block length; ``None`` means one block of ``gen_length``.
        temperature: 0 for greedy decoding, otherwise Gumbel-max sampling at this temperature.
        remasking: ``"low_confidence"`` (reveal the most probable candidates first) or ``"random"``.
        attention_mask: Optional ``(batch, prompt_length)`` or ``(batch, prompt_length + gen_length)``
            padding mask; a prompt-length mask is extended with ones over the generated positions.
        generator: Random generator for Gumbel noise and random remasking, for reproducible runs.
        progress: Show a tqdm progress bar over the steps.

    Returns:
        ``(batch, prompt_length + gen_length)`` int64 ids: the prompt followed by the generated tokens.

    Raises:
        ValueError: On a bad shape, a ``gen_length`` not divisible by ``block_length``, ``steps`` not
            divisible by the number of blocks, an unknown ``remasking`` or a negative temperature.
    """
    block_length = gen_length if block_length is None else block_length
    num_blocks = _validate(prompt_ids, steps, gen_length, block_length, temperature, remasking)
    batch, prompt_length = prompt_ids.shape
    total = prompt_length + gen_length
    device = prompt_ids.device

    x = torch.full((batch, total), mask_token_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt_ids
    if attention_mask is not None:
        if attention_mask.shape == (batch, prompt_length):
            ones = attention_mask.new_ones(batch, gen_length)
            attention_mask = torch.cat([attention_mask, ones], dim=1)
        elif attention_mask.shape != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, prompt_length) "
                f"= {(batch, prompt_length)} or (batch, prompt_length + gen_length) = {(batch, total)}."
            )
    call_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}

    steps_per_block = steps // num_blocks
    positions = torch.arange(total, device=device)
    mask_index = torch.tensor([mask_token_id], device=device)
    bar = tqdm(total=steps, desc="generate", disable=not progress)
    for block in range(num_blocks):
        lo = prompt_length + block * block_length
        in_block = (positions >= lo) & (positions < lo + block_length)
        schedule = transfer_schedule((x[:, in_block] == mask_token_id).sum(1), steps_per_block)
        for step in range(steps_per_block):
            # Only masked positions of the current block may be revealed; this also protects masks
            # that a caller left inside the prompt.
            open_ = (x == mask_token_id) & in_block
            logits = _logits_of(model(x, **call_kwargs))
            # Never propose the mask token itself: a revealed position must hold a real token.
            logits = logits.index_fill(-1, mask_index, float("-inf"))
            candidate = _candidates(logits, temperature, generator)
            if remasking == "low_confidence":
                probs = torch.softmax(logits.double(), dim=-1)
                confidence = probs.gather(-1, candidate[..., None]).squeeze(-1)
            else:
                confidence = _uniform(x.shape, generator, device)
            confidence = confidence.masked_fill(~open_, float("-inf"))
            # Reveal the k most confident open positions of each row (k varies by row).
            order = confidence.argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, -1).contiguous())
            reveal = open_ & (rank < schedule[:, step : step + 1])
            x = torch.where(reveal, candidate, x)
            bar.update(1)
    bar.close()
    return x
