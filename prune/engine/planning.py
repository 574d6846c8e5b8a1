"""One linear's plan and its fate: the mask (magnitude, Wanda or SparseGPT; refined where a Gram matrix is
at hand), writing it into the model, reading it back, undoing it, and the :class:`PruneResult`.

Shared by the one-shot path (:mod:`prune.engine.apply`) and the block-wise one
(:mod:`prune.engine.sequential`); they call these through the module (``planning.write``), so a test can
plant a failure in one place.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prune.engine import write_check
from prune.methods import allocation as allocation_mod
from prune.methods import masks as masks_mod
from prune.methods.refine import RefineSettings, finish_plan
from prune.methods.sparsegpt import sparsegpt_prune
from prune.methods.wanda import magnitude_scores, wanda_scores

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What :func:`apply` did.

    Attributes:
        masks: ``{module name: bool keep-mask (out, in)}``, True = kept.
        report: one row per pruned linear: layer, shape, sparsity (zeros of the weight read back from
            the model after the write), seconds.
        settings: method, sparsity, pattern and sink parameters (saved with the masks).
        weights: for SparseGPT, the reconstructed kept weights ``{name: Tensor}`` (CPU), since the
            mask alone does not reproduce them.
        plan: for ``pattern="structured"``, the structured plan that was applied.
        coverage: per block, the fraction of its weights considered, the achieved sparsity (zeros over
            all its weights) and what was left out, and why (:mod:`prune.engine.coverage`).
        recipe: the :class:`prune.Recipe` of the run (also in ``settings["recipe"]``).
    """

    masks: dict[str, Tensor]
    report: Any
    settings: dict[str, Any]
    weights: dict[str, Tensor] = field(default_factory=dict)
    plan: Any = None
    coverage: Any = None
    recipe: Any = None


def finite(name: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"statistics for {name} contain NaN or Inf; the calibration activations overflowed. Record "
            "the calibration with the model in float32 or bfloat16 (not float16)."
        )


@dataclass(frozen=True)
class Selection:
    """How every selected linear is pruned: method, pattern and SparseGPT's settings."""

    method: str
    sparsity: float
    kind: str  # "unstructured" or "n:m"
    n: int
    m: int
    blocksize: int
    percdamp: float
    refine: RefineSettings | None = None  # mask refinement (prune.methods.refine), or None


def plan_linear(
    name: str,
    module: nn.Linear,
    how: Selection,
    norm: Tensor | None,
    hessian: Tensor | None,
    gram: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Mask, SparseGPT's new weight (or None) and report row of one linear; nothing is modified.

    With a Gram matrix (``gram``, or SparseGPT's ``hessian``) the plan is refined when ``how.refine``
    says so and the row gains the layer's relative error (:mod:`prune.methods.layer_error`).
    """
    start = time.perf_counter()
    if how.method == "wanda" and norm is None or how.method == "sparsegpt" and hessian is None:
        raise ValueError(f"the store has no statistics for {name}; exclude it with ignore= or re-record")
    for stat in (norm, hessian):
        if stat is not None:
            finite(name, stat)
    new_weight = None
    # SparseGPT's solve with this linear's settings; ``mask=`` re-solves the kept weights of a given mask.
    solve = functools.partial(
        sparsegpt_prune,
        module.weight,
        hessian,
        how.sparsity,
        prune_n=how.n,
        prune_m=how.m,
        blocksize=how.blocksize,
        percdamp=how.percdamp,
    )
    if how.method == "sparsegpt":
        new_weight, mask = solve()
    else:
        scores = (
            magnitude_scores(module.weight)
            if how.method == "magnitude"
            else wanda_scores(module.weight, norm)
        )
        pattern = "unstructured" if how.kind == masks_mod.UNSTRUCTURED else f"{how.n}:{how.m}"
        mask = masks_mod.select_mask(scores, pattern, how.sparsity)
    gram = hessian if gram is None else gram
    extra: dict[str, Any] = {}
    if gram is not None:
        n_m = (how.n, how.m) if how.kind == masks_mod.N_M else None
        resolve = (lambda keep: solve(mask=keep)[0]) if how.method == "sparsegpt" else None
        mask, new_weight, extra = finish_plan(
            module.weight, mask, new_weight, gram, n_m=n_m, settings=how.refine, resolve=resolve
        )
    row = {**report_row(name, module, mask, time.perf_counter() - start), **extra}
    # One-shot planning holds every linear's plan until all exist: keep them on the host, not the device
    # (SparseGPT's new weights of an 8B model would be a second copy of it there).
    return mask.cpu(), None if new_weight is None else new_weight.cpu(), row


def check_written(linears: dict[str, Any], plan: dict[str, tuple[Tensor, Tensor | None]]) -> None:
    """Read every written weight back from the model: its zeros must cover its mask
    (prune.engine.write_check)."""
    write_check.check_written(linears, {name: mask for name, (mask, _) in plan.items()})


def restore(linears: dict[str, Any], backup: dict[str, Tensor]) -> None:
    for name, weight in backup.items():
        linears[name].weight.copy_(weight.to(linears[name].weight.device))


def write(module: nn.Linear, mask: Tensor, new_weight: Tensor | None) -> None:
    if new_weight is not None:
        module.weight.copy_(new_weight.to(module.weight.dtype))
    module.weight.mul_(mask.to(module.weight.device, module.weight.dtype))


def report_row(name: str, module: nn.Linear, mask: Tensor, seconds: float) -> dict[str, Any]:
    return {
        "layer": name,
        "shape": f"{module.out_features}x{module.in_features}",
        "sparsity": masks_mod.achieved_sparsity(mask),
        "seconds": seconds,
    }


def make_result(plan: dict[str, tuple[Tensor, Tensor | None]], rows: list[dict], meta: dict) -> PruneResult:
    import pandas as pd

    columns = ["layer", "shape", "sparsity", "seconds", "error", "error_before", "swaps"]
    columns = columns[:5] + [c for c in columns[5:] if any(c in row for row in rows)]
    report = pd.DataFrame(rows, columns=columns)  # error: NaN where no Gram matrix was at hand
    if len(report):
        overall = allocation_mod.global_sparsity({name: mask for name, (mask, _) in plan.items()})
        logger.info("pruned %d linears, achieved sparsity %.4f overall", len(report), overall)
    return PruneResult(
        masks={name: mask.cpu() for name, (mask, _) in plan.items()},
        report=report,
        settings=meta,
        weights={name: w.cpu() for name, (_, w) in plan.items() if w is not None},
    )


def select_linears(model: nn.Module, store, targets: str | None, ignore: str | None) -> dict[str, nn.Linear]:
    """The block linears ``prune.apply`` considers: the store's (or the model's), filtered by the regexes."""
    modules = dict(model.named_modules())
    if store is not None:
        names = list(store.fingerprint.get("linears", {}))
    else:
        from attnprobe import discover

        names = list(discover(model).linears)
    if targets is not None:
        names = [n for n in names if re.fullmatch(targets, n)]
    if ignore is not None:
        names = [n for n in names if not re.fullmatch(ignore, n)]
    chosen = {n: modules[n] for n in names if isinstance(modules.get(n), nn.Linear)}
    if not chosen:
        raise ValueError(
            f"no linear layer selected (targets={targets!r}, ignore={ignore!r}); block linears of this "
            f"model include {names[:5]}"
        )
    return chosen
