"""``prune.apply``: score, select and apply sparse masks in place, transactionally.

Phases stay visible: statistics (from the store, or by running its recorded inputs through the blocks,
:mod:`prune.blockwise`) → scores → masks → apply. One-shot pruning computes every mask before any
weight changes, so a failure anywhere leaves the model untouched. Sequential pruning must change block
i before it can measure block i + 1; it copies each block's weights to ``offload_device`` before
writing them and restores every written block if anything fails.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from prune import coverage as coverage_mod
from prune import experts as experts_mod
from prune import masks as masks_mod
from prune.distributed import plan_linears, share_steps
from prune.onload import check_materialized
from prune.sparsegpt import sparsegpt_prune
from prune.statistics import SinkSettings, activation_norms
from prune.store_checks import as_store, check_fingerprint, hessians_from_store
from prune.wanda import check_accumulation, magnitude_scores, wanda_scores

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS_HELP = '"unstructured", "N:M" (e.g. "2:4"), "structured", "blocks" or "experts"'


@dataclass
class PruneResult:
    """What :func:`apply` did.

    Attributes:
        masks: ``{module name: bool keep-mask (out, in)}``, True = kept.
        report: one row per pruned linear: layer, shape, sparsity (achieved), seconds.
        settings: method, sparsity, pattern and sink parameters (saved with the masks).
        weights: for SparseGPT, the reconstructed kept weights ``{name: Tensor}`` (CPU), since the
            mask alone does not reproduce them.
        plan: for ``pattern="structured"``, the structured plan that was applied.
        coverage: per block, the fraction of its weights considered, the achieved sparsity (zeros over
            all its weights) and what was left out, and why (:mod:`prune.coverage`).
    """

    masks: dict[str, Tensor]
    report: Any
    settings: dict[str, Any]
    weights: dict[str, Tensor] = field(default_factory=dict)
    plan: Any = None
    coverage: Any = None


def _select_linears(model: nn.Module, store, targets: str | None, ignore: str | None) -> dict[str, nn.Linear]:
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


def _validate(method: str, sparsity: float, pattern: str, accumulate: str) -> tuple[str, int, int]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    check_accumulation(accumulate)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (0.5 prunes half the weights), got {sparsity!r}")
    if pattern in ("structured", "blocks", "experts"):
        return pattern, 0, 0
    try:
        kind, n, m = masks_mod.parse_pattern(pattern, sparsity)
    except ValueError as err:
        raise ValueError(f"{err} Valid patterns: {PATTERNS_HELP}.") from None
    return kind, n or 0, m or 0


def _finite(name: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"statistics for {name} contain NaN or Inf; the calibration activations overflowed. Record "
            "the calibration with the model in float32 or bfloat16 (not float16)."
        )


@dataclass(frozen=True)
class _Selection:
    """How every selected linear is pruned: method, pattern and SparseGPT's settings."""

    method: str
    sparsity: float
    kind: str  # "unstructured" or "n:m"
    n: int
    m: int
    blocksize: int
    percdamp: float


def _plan_linear(
    name: str, module: nn.Linear, how: _Selection, norm: Tensor | None, hessian: Tensor | None
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Mask, SparseGPT's new weight (or None) and report row of one linear; nothing is modified."""
    start = time.perf_counter()
    if how.method == "wanda" and norm is None or how.method == "sparsegpt" and hessian is None:
        raise ValueError(f"the store has no statistics for {name}; exclude it with ignore= or re-record")
    for stat in (norm, hessian):
        if stat is not None:
            _finite(name, stat)
    new_weight = None
    if how.method == "sparsegpt":
        new_weight, mask = sparsegpt_prune(
            module.weight,
            hessian,
            how.sparsity,
            prune_n=how.n,
            prune_m=how.m,
            blocksize=how.blocksize,
            percdamp=how.percdamp,
        )
    else:
        scores = (
            magnitude_scores(module.weight)
            if how.method == "magnitude"
            else wanda_scores(module.weight, norm)
        )
        pattern = "unstructured" if how.kind == masks_mod.UNSTRUCTURED else f"{how.n}:{how.m}"
        mask = masks_mod.select_mask(scores, pattern, how.sparsity)
    row = _report_row(name, module, mask, time.perf_counter() - start)
    # One-shot planning holds every linear's plan until all exist: keep them on the host, not the device
    # (SparseGPT's new weights of an 8B model would be a second copy of it there).
    return mask.cpu(), None if new_weight is None else new_weight.cpu(), row


@torch.no_grad()
def apply(
    model: nn.Module,
    store,
    sparsity: float,
    *,
    method: str = "wanda",
    sink_aware: bool = False,
    pattern: str = "unstructured",
    sequential: bool = False,
    accumulate: str = "wanda",
    sink_std: float | None = None,
    sink_alpha: float | None = None,
    sink_policy: str = "all",
    unstable_threshold: float = 0.05,
    targets: str | None = None,
    ignore: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    structured_mode: str = "uniform",
    score: str | None = None,
    bias_compensation: bool = False,
    iterative: bool = False,
    keep_ends: bool = True,
    allow_other_weights: bool = False,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
    strict: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place from a calibration store.

    Args:
        model: the model the store was recorded from (checked by fingerprint).
        store: the calibration store: the object bound by ``with attnprobe.record(model) as store``
            (after the block), ``attnprobe.open(path)``, or the path itself. Recorded with linear
            statistics (the default; ``hessians=True`` for one-shot SparseGPT); may be ``None`` for
            ``method="magnitude"``.
        sparsity: fraction of each selected linear's weights pruned, in [0, 1). With
            ``pattern="structured"``: the fraction of heads and MLP channels removed per layer;
            ``"blocks"``: of the blocks (``round(ratio · n)``); ``"experts"``: of each MoE layer's experts.
        method: ``"magnitude"``, ``"wanda"`` (arXiv 2306.11695) or ``"sparsegpt"`` (arXiv 2301.00774).
        sink_aware: down-weight sink token rows by ``w = 1 − s`` before scoring (arXiv 2602.17664).
        pattern: ``"unstructured"`` (exact count per output row), ``"N:M"`` (N pruned of every M
            consecutive inputs), or ``"structured"`` (see :mod:`prune.structured`).
        sequential: prune block by block, each block's statistics measured on inputs propagated through
            the already-pruned blocks (as Wanda and SparseGPT publish), by the block-wise engine
            (:mod:`prune.blockwise`): the store's input ids are embedded once, then every block runs
            twice per step, so the cost is linear in depth. Sink weights come from the store's
            attention mass; linear statistics and Hessians on disk are not needed. Default ``False``:
            one shot from the store, no forward pass for the Wanda family, so changing sink
            parameters is instant.
        accumulate: ``"wanda"`` (sqrt of the mean of Σx²) or ``"reference"`` (the public Sink-Aware
            code's sum of per-sample L2 norms).
        sink_std, sink_alpha: sink rule parameters (default: those recorded).
        sink_policy: ``"all"``, or ``"unstable"``: only sinks whose score varies across the steps of a
            sequence are down-weighted, stable sinks are kept (the paper's description).
        unstable_threshold: variance threshold of the ``unstable`` policy.
        targets, ignore: regexes (full match) over linear names selecting what is pruned. Only the
            linears inside attention blocks are candidates: embeddings and the LM head are untouched.
        blocksize, percdamp: SparseGPT's block size and damping.
        structured_mode: ``"uniform"`` or ``"global"`` for ``pattern="structured"``.
        score: how whole units are scored. ``pattern="blocks"``: ``"bi"`` (default, Block Influence over
            every recorded step, :mod:`prune.block_influence`) or ``"bi-clean"`` (clean steps only);
            ``"experts"``: ``"reap"`` (default), ``"frequency"`` or ``"norm"`` (:mod:`prune.expert_removal`);
            ``"structured"``: ``"wanda-sp"`` (default) or ``"flap"`` (:mod:`prune.flap`).
        bias_compensation: ``pattern="structured"``: add the removed channels' mean output to the bias (FLAP).
        iterative: ``pattern="blocks"``: remove one block at a time and re-measure (:mod:`prune.blocks`).
        keep_ends: ``pattern="blocks"``: never remove the first or the last block.
        allow_other_weights: apply a store whose weight sample differs from ``model``'s (a store of
            the base model applied to a fine-tuned sibling, on purpose). Class and shapes must match.
        device: with ``sequential=True``, onload: the model may live on the CPU and each block (and,
            for embedding the inputs, the rest of the model) visits ``device`` in turn, so the device
            holds one block's weights, statistics and activations, never the whole model.
        offload_device: where block inputs are cached between blocks (``sequential=True``).
        strict: raise instead of warning when a weight-bearing block parameter has no adapter and so
            would stay dense (:mod:`prune.coverage`); routers and the user's exclusions never warn.
        progress: show progress bars.

    Returns:
        A :class:`PruneResult`.

    Raises:
        ValueError: bad arguments, a store from another model or checkpoint or lacking what the method
            needs, or NaN/Inf statistics. The model is left untouched.
        TypeError: ``store`` is not a store, a closed recording or a path.

    Example:
        >>> result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True)  # doctest: +SKIP
        >>> result.report.head()                                                     # doctest: +SKIP
    """
    kind, n, m = _validate(method, sparsity, pattern, accumulate)
    if store is None and (method != "magnitude" or sequential):
        raise ValueError(
            f"method={method!r} needs a calibration store; only 'magnitude' runs without one. Record one "
            "with `with attnprobe.record(model) as store: attnprobe.calibrate(model, ids)`."
        )
    if store is not None:
        store = as_store(store)
        check_fingerprint(model, store, allow_other_weights=allow_other_weights)
    settings = SinkSettings(
        sink_std if sink_std is not None else (store.options.get("sink_std", 2.0) if store else 2.0),
        sink_alpha if sink_alpha is not None else (store.options.get("sink_alpha", 5.0) if store else 5.0),
        sink_policy,
        unstable_threshold,
    )
    meta = {
        "method": method,
        "sparsity": float(sparsity),
        "pattern": pattern,
        "sink_aware": sink_aware,
        "sequential": sequential,
        "accumulate": accumulate,
        "sink_std": settings.sink_std,
        "sink_alpha": settings.sink_alpha,
        "sink_policy": sink_policy,
        "model_class": type(model).__name__,
    }
    if device is not None and not sequential:
        raise ValueError(
            f"device={device!r} onloads blocks one at a time, which only sequential pruning does; pass "
            "sequential=True, or move the model to the device yourself for one-shot pruning."
        )
    if kind in ("blocks", "experts"):  # whole blocks or experts leave the model (prune.removal)
        from prune.removal import apply_removal

        how = (score, sink_aware, settings, iterative, keep_ends)
        return apply_removal(model, store, sparsity, kind, *how, meta)
    if kind == "structured":
        if targets is not None or ignore is not None:
            raise ValueError(
                "targets=/ignore= do not apply to pattern='structured': every supported attention and "
                "MLP block is pruned at the same ratio. Drop them, or prune unstructured."
            )
        meta.update(score=score or "wanda-sp", bias_compensation=bias_compensation)
        return _apply_structured(
            model, store, sparsity, sink_aware, settings, accumulate, structured_mode, meta
        )
    try:
        linears = _select_linears(model, store, targets, ignore)
    except ValueError:
        if not experts_mod.fused_selected(model, targets, ignore):  # targets= may name only fused experts
            raise
        linears = {}
    check_materialized(linears)
    # Mixture-of-experts: fused expert slices join the selection, routers leave it (prune.experts).
    linears, fallbacks = experts_mod.select(model, linears, store, method, targets, ignore)
    left_out = coverage_mod.check_selection(model, linears, strict=strict)
    how = _Selection(method, float(sparsity), kind, n, m, blocksize, percdamp)
    if sequential:
        onload = (device, offload_device)
        result = _apply_sequential(
            model, store, linears, meta, how, sink_aware, settings, accumulate, progress, onload
        )
        result.coverage = coverage_mod.report_selection(model, result.masks, left_out)
        return result
    norms: dict[str, Tensor] = {}
    hessians: dict[str, Tensor] = {}
    if method == "wanda":
        norms = activation_norms(store, sink_aware=sink_aware, settings=settings, accumulate=accumulate)
    elif method == "sparsegpt":
        hessians = hessians_from_store(store, sink_aware, settings)
    fallback = replace(how, method="magnitude")  # experts no calibration token was routed to
    # In a process group each rank plans a share of the linears and receives the rest (prune.distributed).
    plan, rows = plan_linears(
        linears,
        lambda name, module: _plan_linear(
            name, module, fallback if name in fallbacks else how, norms.get(name), hessians.get(name)
        ),
        method=method,
        progress=progress,
    )
    # Every mask exists: only now touch the weights.
    for name, (mask, new_weight) in plan.items():
        _write(linears[name], mask, new_weight)
    result = _result(plan, rows, meta)
    experts_mod.annotate(result.report, fallbacks)
    result.coverage = coverage_mod.report_selection(model, plan, left_out)
    return result


def _write(module: nn.Linear, mask: Tensor, new_weight: Tensor | None) -> None:
    if new_weight is not None:
        module.weight.copy_(new_weight.to(module.weight.dtype))
    module.weight.mul_(mask.to(module.weight.device, module.weight.dtype))


def _report_row(name: str, module: nn.Linear, mask: Tensor, seconds: float) -> dict[str, Any]:
    return {
        "layer": name,
        "shape": f"{module.out_features}x{module.in_features}",
        "sparsity": masks_mod.achieved_sparsity(mask),
        "seconds": seconds,
    }


def _result(plan: dict[str, tuple[Tensor, Tensor | None]], rows: list[dict], meta: dict) -> PruneResult:
    import pandas as pd

    report = pd.DataFrame(rows, columns=["layer", "shape", "sparsity", "seconds"])
    if len(report):
        logger.info("pruned %d linears, achieved sparsity %.4f", len(report), report["sparsity"].mean())
    return PruneResult(
        masks={name: mask.cpu() for name, (mask, _) in plan.items()},
        report=report,
        settings=meta,
        weights={name: w.cpu() for name, (_, w) in plan.items() if w is not None},
    )


def _apply_sequential(
    model, store, linears, meta, how: _Selection, sink_aware, settings, accumulate, progress, onload
) -> PruneResult:
    """Block-wise sequential pruning (:mod:`prune.blockwise`), undone entirely if anything fails."""
    from prune.block_experts import ExpertBlockStatistics
    from prune.blockwise import prune_blockwise, steps_from_store

    device, offload_device = onload
    statistic = {"wanda": "sumsq" if accumulate == "wanda" else "norms", "sparsegpt": "hessian"}
    statistic = statistic.get(how.method)
    steps = steps_from_store(store, settings if sink_aware else None) if statistic else []
    steps, finish_statistics = share_steps(steps)  # process group: each rank a share, sums all-reduced
    backup: dict[str, Tensor] = {}  # original weights of the blocks pruned so far, on offload_device
    plan: dict[str, tuple[Tensor, Tensor | None]] = {}
    rows = []
    notes: dict[str, str] = {}
    fallback = replace(how, method="magnitude")  # experts no weighted calibration row reached

    def plan_one(name, module, stats):  # module: an nn.Linear, or a fused expert slice (SliceView)
        group = stats.of(name) if stats is not None else None
        if stats is not None and group is None:
            raise ValueError(
                f"{name} received no input while its block ran over the calibration steps; exclude "
                "it with ignore= or check that the block calls it"
            )
        starved = stats is not None and stats.starved(name)
        norm = group.norm() if how.method == "wanda" and not starved else None
        hessian = group.hessian() if how.method == "sparsegpt" and not starved else None
        return _plan_linear(name, module, fallback if starved else how, norm, hessian)

    def prune_block(block, stats) -> None:
        for name in block.linears:  # on every rank: another rank may plan the linear
            if stats is not None and stats.of(name) is not None and stats.starved(name):
                notes[name] = experts_mod.FALLBACK_NOTE
        # In a process group each rank plans a share of the block's linears (prune.distributed).
        block_plan, block_rows = plan_linears(
            {name: linears[name] for name in block.linears},
            lambda name, module: plan_one(name, module, stats),
            method=how.method,
            progress=False,
        )
        rows.extend(block_rows)
        for name, (mask, new_weight) in block_plan.items():  # the whole block planned: now write it
            backup[name] = linears[name].weight.detach().to(offload_device, copy=True)
            _write(linears[name], mask, new_weight)
            plan[name] = (mask.cpu(), None if new_weight is None else new_weight.to(offload_device))

    try:
        prune_blockwise(
            model,
            steps,
            list(linears),
            prune_block,
            statistic=statistic,
            device=device,
            offload_device=offload_device,
            finish_statistics=finish_statistics,
            statistics=ExpertBlockStatistics,
            progress=progress,
        )
    except BaseException:
        for name, weight in backup.items():
            linears[name].weight.copy_(weight.to(linears[name].weight.device))
        raise
    result = _result(plan, rows, meta)
    experts_mod.annotate(result.report, notes)
    return result


def _apply_structured(model, store, ratio, sink_aware, settings, accumulate, mode, meta) -> PruneResult:
    """Wanda-sp / FLAP structured pruning from the store's activation norms (``prune.structured``).

    Refuses what it cannot honour before computing anything: another method (the score is Wanda's),
    ``sequential=True``, or an architecture without adapters. The report has one row per
    linear whose shape changed: dense → pruned shape, the fraction of its weights removed, and an
    equal share of the total planning + slicing time.
    """
    from prune import structured

    if meta["method"] != "wanda":
        raise ValueError(
            f"pattern='structured' scores heads and channels with Wanda-sp (|W| times activation norms); "
            f"method={meta['method']!r} is not available for it. Use method='wanda' (the default)."
        )
    if meta["sequential"]:
        raise ValueError("pattern='structured' is one-shot from the store; pass sequential=False.")
    structured.find_structures(model)  # unsupported architecture: fail before reading the store
    start = time.perf_counter()
    norms = activation_norms(store, sink_aware=sink_aware, settings=settings, accumulate=accumulate)
    for name, norm in norms.items():
        _finite(name, norm)
    from prune.flap import structured_inputs

    scores, means = structured_inputs(
        store, model, meta["score"], meta["bias_compensation"], sink_aware, settings
    )
    plan = structured.plan_structured(
        model, norms, ratio, mode=mode, scores=scores, act_means=means, create_bias=means is not None
    )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    dense = {n: (m.out_features, m.in_features) for n, m in linears.items()}
    structured.apply_plan(model, plan)
    seconds = time.perf_counter() - start
    rows = []
    for name, (out_f, in_f) in dense.items():
        module = linears[name]
        if (module.out_features, module.in_features) != (out_f, in_f):
            rows.append(
                {
                    "layer": name,
                    "shape": f"{out_f}x{in_f}->{module.out_features}x{module.in_features}",
                    "sparsity": 1 - module.out_features * module.in_features / (out_f * in_f),
                    "seconds": 0.0,
                }
            )
    for row in rows:  # planning and slicing are not timed per linear: share the total equally
        row["seconds"] = seconds / len(rows)
    import pandas as pd

    report = pd.DataFrame(rows, columns=["layer", "shape", "sparsity", "seconds"])
    logger.info(
        "structured pruning (%s, ratio %.3f) shrank %d linears in %.2fs", mode, ratio, len(rows), seconds
    )
    return PruneResult(masks={}, report=report, settings={**meta, "structured_mode": mode}, plan=plan)
