"""``prune.apply``: score, select and apply sparse masks in place, transactionally.

Phases stay visible: statistics (from the store, or by running its recorded inputs through the blocks,
:mod:`prune.engine.blockwise`) → scores → masks → apply. One-shot pruning computes every mask before any
weight changes, so a failure anywhere leaves the model untouched. Sequential pruning must change block
i before it can measure block i + 1; it copies each block's weights to ``offload_device`` before
writing them and restores every written block if anything fails. Either way, every weight written is
then read back from the model and its zeros must cover its mask (:mod:`prune.engine.write_check`); if not,
every weight is restored and :class:`prune.engine.write_check.WriteCheckError` names the failures.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from prune.engine import coverage as coverage_mod
from prune.engine import experts as experts_mod
from prune.engine import planning, write_check
from prune.engine import sequential as sequential_engine
from prune.engine.block_cache import check_offload
from prune.engine.distributed import plan_linears
from prune.engine.onload import check_materialized
from prune.engine.planning import PruneResult
from prune.engine.statistics import SinkSettings, activation_norms
from prune.engine.store_checks import as_store, check_fingerprint, grams_from_store, hessians_from_store
from prune.engine.structured_apply import apply_structured
from prune.methods import allocation as allocation_mod
from prune.methods import masks as masks_mod
from prune.methods.refine import RefineSettings
from prune.methods.wanda import check_accumulation
from prune.recipe import DEFAULTS as _D
from prune.recipe import records_recipe

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS_HELP = '"unstructured", "N:M" (e.g. "2:4"), "structured", "blocks" or "experts"'


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


@records_recipe
@torch.no_grad()
def apply(
    model: nn.Module,
    store,
    sparsity: float,
    *,
    method: str = _D.method,
    sink_aware: bool = _D.sink_aware,
    pattern: str = _D.pattern,
    sequential: bool = _D.sequential,
    accumulate: str = _D.accumulate,
    sink_std: float | None = _D.sink_std,
    sink_alpha: float | None = _D.sink_alpha,
    sink_policy: str = _D.sink_policy,
    unstable_threshold: float = _D.unstable_threshold,
    targets: str | None = _D.targets,
    ignore: str | None = _D.ignore,
    blocksize: int = _D.blocksize,
    percdamp: float = _D.percdamp,
    structured_mode: str = _D.structured_mode,
    score: str | None = _D.score,
    bias_compensation: bool = _D.bias_compensation,
    iterative: bool = _D.iterative,
    keep_ends: bool = _D.keep_ends,
    allow_other_weights: bool = _D.allow_other_weights,
    device: torch.device | str | None = _D.device,
    offload_device: torch.device | str = _D.offload_device,
    cache_dir: str | None = _D.cache_dir,
    strict: bool = _D.strict,
    allocation: Any = _D.allocation,
    owl_m: float = _D.owl_m,
    owl_lambda: float = _D.owl_lambda,
    sensitivity_range: float = _D.sensitivity_range,
    refine: bool = _D.refine,
    refine_iterations: int = _D.refine_iterations,
    refine_candidates: int = _D.refine_candidates,
    refine_seconds: float | None = _D.refine_seconds,
    layer_error: bool | None = _D.layer_error,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place from a calibration store.

    Every option (defaults included) is a field of :class:`prune.Recipe`; ``apply(model, store,
    recipe)`` takes them as one object, and the result carries the recipe of the run either way.

    Args:
        model: the model the store was recorded from (checked by fingerprint).
        store: the calibration store: the object bound by ``with attnprobe.record(model) as store``
            (after the block), ``attnprobe.open(path)``, or the path itself. Recorded with linear
            statistics (the default; ``hessians=True`` for one-shot SparseGPT); may be ``None`` for
            ``method="magnitude"``.
        sparsity: fraction of each selected linear's weights pruned, in [0, 1), or a
            :class:`prune.Recipe` holding it and every option below. With
            ``pattern="structured"``: the fraction of heads and MLP channels removed per layer;
            ``"blocks"``: of the blocks (``round(ratio · n)``); ``"experts"``: of each MoE layer's experts.
        method: ``"magnitude"``, ``"wanda"`` (arXiv 2306.11695) or ``"sparsegpt"`` (arXiv 2301.00774).
        sink_aware: down-weight sink token rows by ``w = 1 − s`` before scoring (arXiv 2602.17664).
        pattern: ``"unstructured"`` (exact count per output row), ``"N:M"`` (N pruned of every M
            consecutive inputs), or ``"structured"`` (see :mod:`prune.methods.structured`).
        sequential: prune block by block, each block's statistics measured on inputs propagated through
            the already-pruned blocks (as Wanda and SparseGPT publish), by the block-wise engine
            (:mod:`prune.engine.blockwise`): the store's input ids are embedded once, then every block runs
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
            every recorded step, :mod:`prune.engine.block_influence`) or ``"bi-clean"`` (clean steps only);
            ``"experts"``: ``"reap"`` (default), ``"frequency"`` or ``"norm"``
            (:mod:`prune.engine.expert_removal`);
            ``"structured"``: ``"wanda-sp"`` (default) or ``"flap"`` (:mod:`prune.engine.flap`).
        bias_compensation: ``pattern="structured"``: add the removed channels' mean output to the bias (FLAP).
        iterative: ``pattern="blocks"``: remove one block at a time and re-measure
        (:mod:`prune.engine.blocks`).
        keep_ends: ``pattern="blocks"``: never remove the first or the last block.
        allow_other_weights: apply a store whose weight sample differs from ``model``'s (a store of
            the base model applied to a fine-tuned sibling, on purpose). Class and shapes must match.
        device: with ``sequential=True``, onload: the model may live on the CPU and each block (and,
            for embedding the inputs, the rest of the model) visits ``device`` in turn, so the device
            holds one block's weights, statistics and activations, never the whole model.
        offload_device: where block inputs are cached between blocks (``sequential=True``): a torch
            device, or ``"disk"``: memory-mapped safetensors files in a temporary directory, read back
            one step at a time with the next step prefetched, so host memory stays a few steps' worth
            (:mod:`prune.engine.block_cache`; same masks as in memory). The rollback copy and SparseGPT's
            weights stay in memory (on the CPU with ``"disk"``).
        cache_dir: with ``offload_device="disk"``, where the temporary directory is made (default:
            the system's temporary directory); it is deleted when ``apply`` returns or fails.
        strict: raise instead of warning when a weight-bearing block parameter has no adapter and so
            would stay dense (:mod:`prune.engine.coverage`); routers and the user's exclusions never warn.
        allocation: how ``sparsity`` is spread over the linears (:mod:`prune.methods.allocation`, unstructured
            only): ``"uniform"``, ``"owl"`` (arXiv 2310.05175, with ``owl_m`` = M and ``owl_lambda`` =
            λ), ``"sensitivity"`` (each linear's measured error at ``sparsity ± sensitivity_range``,
            summed error minimised under the global budget), a ``{name regex: sparsity}`` mapping or a
            callable ``(name, weight) -> sparsity | None``. Computed allocations keep the zeros of all
            selected weights at ``sparsity`` (within one row); the per-linear values go to
            ``settings["layer_sparsity"]``.
        refine: refine each mask by error-lowering 1-swaps within rows under the (sink-weighted)
            Gram matrix (SparseSwaps, arXiv 2512.10922; :mod:`prune.methods.refine`): at most
            ``refine_iterations`` swaps per row, ``refine_candidates`` candidates per side, and
            ``refine_seconds`` per linear. One-shot it needs a store recorded with ``hessians=True``.
        layer_error: add each linear's relative error ``‖(W − Ŵ)X‖² / ‖WX‖²`` to the report
            (:mod:`prune.methods.layer_error`). None: when the Gram matrix is at hand (the store's Hessians
            one-shot; SparseGPT's, refinement's or ``layer_error=True``'s block-wise). True: always
            (block-wise Wanda then accumulates Hessians instead of norms). False: never.
        progress: show progress bars.

    Returns:
        A :class:`PruneResult`.

    Raises:
        ValueError: bad arguments, a store from another model or checkpoint or lacking what the method
            needs, or NaN/Inf statistics. The model is left untouched.
        TypeError: ``store`` is not a store, a closed recording or a path.
        prune.engine.write_check.WriteCheckError: a weight read back after the write is not zero where its
            mask prunes; every weight was restored first.

    Example:
        >>> result = prune.apply(model, "runs/calib", 0.5, method="wanda", sink_aware=True, progress=False)
        >>> list(result.report.columns[:3]), round(float(result.report["sparsity"].mean()), 3)
        (['layer', 'shape', 'sparsity'], 0.5)
    """
    kind, n, m = _validate(method, sparsity, pattern, accumulate)
    allocation_mod.check(allocation, kind, owl_m, owl_lambda, sensitivity_range)
    if refine not in (True, False):
        raise ValueError(
            f"refine must be True (SparseSwaps 1-swaps, prune.methods.refine) or False, got {refine!r}"
        )
    if refine and kind == "structured":
        raise ValueError("refine=True swaps weights inside rows; pattern='structured' removes whole rows.")
    refining = RefineSettings(refine_iterations, refine_candidates, refine_seconds) if refine else None
    refining = refining.check() if refining else None
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
        **_quality_settings(allocation, owl_m, owl_lambda, sensitivity_range, refining),
    }
    if device is not None and not sequential:
        raise ValueError(
            f"device={device!r} onloads blocks one at a time, which only sequential pruning does; pass "
            "sequential=True, or move the model to the device yourself for one-shot pruning."
        )
    if kind in ("blocks", "experts"):  # whole blocks or experts leave the model (prune.engine.removal)
        from prune.engine.removal import apply_removal

        how = (score, sink_aware, settings, iterative, keep_ends)
        return apply_removal(model, store, sparsity, kind, *how, meta)
    if sequential:
        check_offload(offload_device, cache_dir)
    elif offload_device == "disk" or cache_dir is not None:
        raise ValueError(
            "offload_device='disk' and cache_dir= hold the block inputs of sequential pruning; one-shot "
            "pruning caches none. Pass sequential=True, or drop them."
        )
    if kind == "structured":
        if targets is not None or ignore is not None:
            raise ValueError(
                "targets=/ignore= do not apply to pattern='structured': every supported attention and "
                "MLP block is pruned at the same ratio. Drop them, or prune unstructured."
            )
        meta.update(score=score or "wanda-sp", bias_compensation=bias_compensation)
        return apply_structured(
            model, store, sparsity, sink_aware, settings, accumulate, structured_mode, meta
        )
    try:
        linears = planning.select_linears(model, store, targets, ignore)
    except ValueError:
        if not experts_mod.fused_selected(model, targets, ignore):  # targets= may name only fused experts
            raise
        linears = {}
    check_materialized(linears)
    # Mixture-of-experts: fused expert slices join the selection, routers leave it (prune.engine.experts).
    linears, fallbacks = experts_mod.select(model, linears, store, method, targets, ignore)
    left_out = coverage_mod.check_selection(model, linears, strict=strict)
    how = planning.Selection(method, float(sparsity), kind, n, m, blocksize, percdamp, refining)
    gram_needed = refine or allocation == "sensitivity" or layer_error is True
    if sequential:
        onload = (device, offload_device, cache_dir)
        alloc = (allocation, owl_m, owl_lambda, sensitivity_range)
        targets = sequential_engine.targets_sequential(
            model, store, linears, how, alloc, sink_aware, settings, accumulate, onload
        )
        meta = _record_targets(meta, targets)
        result = sequential_engine.apply_sequential(
            model,
            store,
            linears,
            meta,
            how,
            sink_aware,
            settings,
            accumulate,
            progress,
            onload,
            targets=targets,
            grams=refine or layer_error is True,
        )
        result.coverage = coverage_mod.report_selection(model, result.masks, left_out)
        return result
    norms: dict[str, Tensor] = {}
    hessians: dict[str, Tensor] = {}
    if method == "wanda":
        norms = activation_norms(store, sink_aware=sink_aware, settings=settings, accumulate=accumulate)
    elif method == "sparsegpt":
        hessians = hessians_from_store(store, sink_aware, settings)
    grams = hessians or (
        {}
        if layer_error is False
        else grams_from_store(store, sink_aware, settings, required=gram_needed, why=_why(refine, allocation))
    )
    targets = allocation_mod.resolve(
        allocation,
        model,
        {name: module.weight for name, module in linears.items()},
        sparsity,
        norms=lambda: (
            norms or activation_norms(store, sink_aware=sink_aware, settings=settings, accumulate=accumulate)
        ),
        curves=lambda candidates: {
            name: [
                (
                    s,
                    sequential_engine.error_at(
                        name, module, replace(how, sparsity=s, refine=None), norms, grams
                    ),
                )
                for s in candidates
            ]
            for name, module in linears.items()
            if name in grams and name not in fallbacks
        },
        owl_m=owl_m,
        owl_lambda=owl_lambda,
        spread=sensitivity_range,
    )
    meta = _record_targets(meta, targets)

    def how_for(name: str) -> planning.Selection:
        chosen = how if targets is None else replace(how, sparsity=targets[name])
        return replace(chosen, method="magnitude") if name in fallbacks else chosen

    # In a process group each rank plans a share of the linears and receives the rest
    # (prune.engine.distributed).
    plan, rows = plan_linears(
        linears,
        lambda name, module: planning.plan_linear(
            name, module, how_for(name), norms.get(name), hessians.get(name), grams.get(name)
        ),
        method=method,
        progress=progress,
    )
    # Every mask exists: only now touch the weights (a host copy first, to undo a failed write check).
    backup = {name: linears[name].weight.detach().to("cpu", copy=True) for name in plan}
    try:
        for name, (mask, new_weight) in plan.items():
            planning.write(linears[name], mask, new_weight)
        planning.check_written(linears, plan)
    except BaseException:
        planning.restore(linears, backup)
        raise
    result = planning.make_result(plan, write_check.measured_rows(linears, rows), meta)
    experts_mod.annotate(result.report, fallbacks)
    result.coverage = coverage_mod.report_selection(model, plan, left_out)
    return result


def _quality_settings(allocation, owl_m, owl_lambda, spread, refining: RefineSettings | None) -> dict:
    """The allocation and refinement entries of ``settings`` (saved with masks and checkpoints)."""
    out: dict[str, Any] = {"allocation": allocation_mod.describe(allocation)}
    if allocation == "owl":
        out.update(owl_m=float(owl_m), owl_lambda=float(owl_lambda))
    if allocation == "sensitivity":
        out["sensitivity_range"] = float(spread)
    out["refine"] = "sparseswaps" if refining else False
    if refining:
        out.update(
            refine_iterations=refining.iterations,
            refine_candidates=refining.candidates,
            refine_seconds=refining.seconds,
        )
    return out


def _record_targets(meta: dict, targets: dict[str, float] | None) -> dict:
    """``settings["layer_sparsity"]``: the per-linear sparsity, passable back as ``allocation=``."""
    return meta if targets is None else {**meta, "layer_sparsity": dict(targets)}


def _why(refine: bool, allocation) -> str:
    if refine:
        return "refine=True"
    return "allocation='sensitivity'" if allocation == "sensitivity" else "layer_error=True"
