"""Memory plan of a pruning run, before any weight is loaded: device and host peak per phase.

The projection ``benchmarks/bench_scale.py`` checks against measurement (docs/BENCHMARKS.md). With
block-wise onloading (``sequential=True, device=...``) the device holds, at any time, one of:

- *block phase*: one block's weights + its extra peak (statistics, solver temporaries, activations);
- *capture phase*: everything outside the blocks (embedding, head) + one step's hidden states.

``device_peak = max(block phase, capture phase)``; the number of blocks does not enter. The benchmark
passes the *measured* extra of one block; :func:`estimate_block_extra` gives it from the shapes:

- Wanda: one float32 vector per linear input; SparseGPT: one float32 Hessian (in × in) per linear, and
  while the widest linear is solved three more of its size (damped Hessian, Cholesky factor, inverse);
- activations of one step through the block, float32 upper bound: ``tokens · (4·hidden + 3·mlp) · 4 B``;
- statistics are collected during the forwards and solved after them, so
  ``extra = statistics + max(activations, solver temporaries)``.

At LLaDA-8B widths this gives 2.63 GiB at L = 4096 for SparseGPT, against 2.61 measured at L = 1024
(bench_scale, the extra barely grows with L). The host holds the model, the cached block inputs
(every step's hidden states), and what ``apply`` keeps until it returns (masks, SparseGPT's weights and
the rollback copy of the pruned weights, on ``offload_device``).

One-shot pruning (``sequential=False``) runs the whole model where it is: device peak = the model +
the recorded statistics + one block's activations.

:func:`plan_from_config` builds the model on PyTorch's ``meta`` device from its config (no weights are
read) to get these shapes; ``attnprobe prune --dry-run`` prints the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

GIB = 2**30
SOLVER_TEMPORARIES = 3  # Hessian-sized float32 matrices SparseGPT holds beside the Hessian (bench_scale)


@dataclass
class ModelShape:
    """What the projection needs from a model: bytes per block and outside, linear input widths."""

    blocks: int
    block_bytes: int  # the largest block's parameters
    outside_bytes: int  # embedding, head, final norm (tied weights once)
    hidden: int
    mlp: int
    linear_inputs: list[int]  # in_features of every linear of the largest block
    linear_bytes: int  # all block linears' weights (what is pruned and backed up)
    linear_numel: int
    total_bytes: int


@dataclass
class MemoryPlan:
    """Projected peaks in bytes, per phase; :meth:`table` prints them."""

    device: str | None
    sequential: bool
    device_peak: int
    host_peak: int
    phases: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        where = self.device or "cpu (no --device: everything on the host)"
        lines = [f"memory plan ({'block-wise onloading' if self.sequential else 'one-shot'}, device {where})"]
        for name, size in self.phases.items():
            lines.append(f"  {name:<44} {size / GIB:8.3f} GiB")
        lines.append(f"  {'device peak':<44} {self.device_peak / GIB:8.3f} GiB")
        lines.append(f"  {'host peak':<44} {self.host_peak / GIB:8.3f} GiB")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def project_peaks(block_weights: int, block_extra: int, outside_blocks: int, step_hidden: int) -> dict:
    """The device peak of block-wise onloading: the larger of the block and the capture phase."""
    block_phase = block_weights + block_extra
    capture_phase = outside_blocks + step_hidden
    return {
        "block_phase": block_phase,
        "capture_phase": capture_phase,
        "device_peak": max(block_phase, capture_phase),
    }


def estimate_block_extra(shape: ModelShape, method: str, tokens: int) -> int:
    """One block's extra device bytes while it is measured and pruned (module docstring)."""
    activations = tokens * (4 * shape.hidden + 3 * shape.mlp) * 4
    if method == "sparsegpt":
        statistics = sum(width * width * 4 for width in shape.linear_inputs)
        solver = SOLVER_TEMPORARIES * max(shape.linear_inputs, default=0) ** 2 * 4
    elif method == "wanda":
        statistics, solver = sum(width * 4 for width in shape.linear_inputs), 0
    else:  # magnitude: no forward, no statistics
        return 0
    return statistics + max(activations, solver)


def model_shape(model: nn.Module) -> ModelShape:
    """Shapes and byte counts of a model (works on the ``meta`` device)."""
    from prune.engine.blockwise import find_blocks

    blocks = [block.module for block in find_blocks(model, [])]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no attention blocks that attnprobe recognises")
    in_blocks = {id(p) for block in blocks for p in block.parameters()}

    def nbytes(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    largest = max(blocks, key=lambda b: nbytes(b.parameters()))
    linears = [m for m in largest.modules() if isinstance(m, nn.Linear)]
    all_linears = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
    widths = sorted({m.out_features for m in linears} | {m.in_features for m in linears})
    hidden = linears[0].in_features if linears else 0
    return ModelShape(
        blocks=len(blocks),
        block_bytes=nbytes(largest.parameters()),
        outside_bytes=nbytes(p for p in model.parameters() if id(p) not in in_blocks),
        hidden=hidden,
        mlp=max(widths, default=0),
        linear_inputs=[m.in_features for m in linears],
        linear_bytes=nbytes(m.weight for m in all_linears),
        linear_numel=sum(m.weight.numel() for m in all_linears),
        total_bytes=nbytes(model.parameters()),
    )


def plan_memory(
    shape: ModelShape,
    *,
    method: str,
    sequential: bool,
    device: str | None,
    windows: int,
    seq_len: int,
    batch_size: int,
    noise_levels: int,
    element_size: int,
) -> MemoryPlan:
    """Device and host peak of pruning a model of ``shape`` with these settings."""
    tokens_per_step = batch_size * seq_len
    extra = estimate_block_extra(shape, method, tokens_per_step)
    step_hidden = tokens_per_step * shape.hidden * element_size
    retained = shape.linear_numel  # bool masks, one byte per weight
    if method == "sparsegpt":
        retained += shape.linear_bytes  # the reconstructed weights
    notes = []
    if sequential:
        peaks = project_peaks(shape.block_bytes, extra, shape.outside_bytes, step_hidden)
        cache = windows * noise_levels * seq_len * shape.hidden * element_size  # every step's block input
        host = shape.total_bytes + cache + retained + shape.linear_bytes  # + rollback copy
        phases = {
            "block phase: one block's weights": shape.block_bytes,
            "block phase: statistics, solver, activations": extra,
            "capture phase: embedding, head, one step": peaks["capture_phase"],
            "host: model": shape.total_bytes,
            "host: cached block inputs (all steps)": cache,
            "host: masks, weights and rollback copy": retained + shape.linear_bytes,
        }
        device_peak = peaks["device_peak"]
        if device is None:  # no onloading: the device is the host
            host, device_peak = host + device_peak - shape.block_bytes, 0
            notes.append("without --device the blocks run on the host: the block phase adds to it")
    else:
        statistics = sum(w * 4 for w in shape.linear_inputs) * shape.blocks
        if method == "sparsegpt":  # plain and sink-weighted Hessians of every linear, recorded at once
            statistics = 2 * sum(w * w * 4 for w in shape.linear_inputs) * shape.blocks
        activations = tokens_per_step * (4 * shape.hidden + 3 * shape.mlp) * 4
        device_peak = shape.total_bytes + statistics + activations
        host = retained
        phases = {
            "model": shape.total_bytes,
            "recorded statistics": statistics,
            "one block's activations": activations,
            "host: masks and weights": retained,
        }
        notes.append("one-shot keeps the whole model on the device; add --sequential for one block at a time")
        if device is None:
            host, device_peak = host + device_peak, 0
    return MemoryPlan(device, sequential, device_peak, host, phases, notes)


def plan_from_config(
    config: Any, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.bfloat16, **settings: Any
) -> tuple[MemoryPlan, ModelShape]:
    """:func:`plan_memory` for the model a transformers ``config`` describes, built without weights."""
    import transformers

    model = None
    with torch.device("meta"):
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                model = auto.from_config(config, trust_remote_code=trust_remote_code)
                break
            except (ValueError, TypeError, KeyError):
                continue
    if model is None:
        raise ValueError(f"cannot build {type(config).__name__} with AutoModelForCausalLM or AutoModel")
    model = model.to(dtype)
    shape = model_shape(model)
    element_size = torch.empty((), dtype=dtype).element_size()
    return plan_memory(shape, element_size=element_size, **settings), shape
