"""Sequential (block-wise) pruning for :func:`prune.apply`: per-linear targets measured on the dense model
(allocation), then the engine (:mod:`prune.engine.blockwise`) plans and writes block by block, undone
entirely if anything fails.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import Tensor

from prune.engine import experts as experts_mod
from prune.engine import planning, write_check
from prune.engine.block_cache import host_device
from prune.engine.distributed import plan_linears, share_steps
from prune.engine.statistics import activation_norms
from prune.methods import allocation as allocation_mod
from prune.methods.layer_error import norm_from_gram

logger = logging.getLogger(__name__)


def error_at(name, module, how: planning.Selection, norms: dict, grams: dict) -> float:
    """The relative error of ``module`` pruned by ``how`` (sensitivity's candidates)."""
    gram = grams[name]
    hessian = gram if how.method == "sparsegpt" else None
    return planning.plan_linear(name, module, how, norms.get(name), hessian, gram)[2]["error"]


def targets_sequential(model, store, linears, how, alloc, sink_aware, settings, accumulate, onload):
    """Per-linear sparsity for sequential pruning, measured on the dense model (engine pass if needed)."""
    from prune.engine.allocation_blockwise import measure_dense

    allocation, owl_m, owl_lambda, spread = alloc
    device, offload_device, cache_dir = onload
    sinks = settings if sink_aware else None

    def norms() -> dict[str, Tensor]:
        if store.options.get("linear_stats"):
            return activation_norms(store, sink_aware=sink_aware, settings=settings, accumulate=accumulate)
        return measure_dense(
            model,
            store,
            linears,
            lambda n, mod, g: g.norm(),
            statistic="sumsq",
            sink_settings=sinks,
            device=device,
            offload_device=offload_device,
            cache_dir=cache_dir,
        )

    def curves(candidates):
        def curve(name, module, group):
            gram = group.hessian()
            chosen = lambda s: replace(how, sparsity=s, refine=None)  # noqa: E731
            return [
                (s, error_at(name, module, chosen(s), {name: norm_from_gram(gram)}, {name: gram}))
                for s in candidates
            ]

        return measure_dense(
            model,
            store,
            linears,
            curve,
            statistic="hessian",
            sink_settings=sinks,
            device=device,
            offload_device=offload_device,
            cache_dir=cache_dir,
        )

    weights = {name: module.weight for name, module in linears.items()}
    return allocation_mod.resolve(
        allocation,
        model,
        weights,
        how.sparsity,
        norms=norms,
        curves=curves,
        owl_m=owl_m,
        owl_lambda=owl_lambda,
        spread=spread,
    )


def apply_sequential(
    model,
    store,
    linears,
    meta,
    how: planning.Selection,
    sink_aware,
    settings,
    accumulate,
    progress,
    onload,
    *,
    targets=None,
    grams=False,
) -> planning.PruneResult:
    """Block-wise sequential pruning (:mod:`prune.engine.blockwise`), undone entirely if anything fails.

    ``targets``: per-linear sparsity (allocation); ``grams``: accumulate Hessians for every method
    (refinement, ``layer_error=True``).
    """
    from prune.engine.block_experts import ExpertBlockStatistics
    from prune.engine.blockwise import prune_blockwise, steps_from_store

    device, offload_device, cache_dir = onload
    host = host_device(offload_device)  # where the rollback copy and SparseGPT's weights are kept
    statistic = {"wanda": "sumsq" if accumulate == "wanda" else "norms", "sparsegpt": "hessian"}
    statistic = statistic.get(how.method)
    if grams and statistic != "hessian":
        if how.method == "wanda" and accumulate != "wanda":
            raise ValueError(
                "block-wise refinement and layer_error=True measure Hessians and take Wanda's norm from "
                "their diagonal, which is accumulate='wanda'; pass accumulate='wanda' or prune one-shot."
            )
        statistic = "hessian"
    steps = steps_from_store(store, settings if sink_aware else None) if statistic else []
    steps, finish_statistics = share_steps(steps)  # process group: each rank a share, sums all-reduced
    backup: dict[str, Tensor] = {}  # original weights of the blocks pruned so far, on offload_device
    plan: dict[str, tuple[Tensor, Tensor | None]] = {}
    rows = []
    notes: dict[str, str] = {}

    def plan_one(name, module, stats):  # module: an nn.Linear, or a fused expert slice (SliceView)
        group = stats.of(name) if stats is not None else None
        if stats is not None and group is None:
            raise ValueError(
                f"{name} received no input while its block ran over the calibration steps; exclude "
                "it with ignore= or check that the block calls it"
            )
        starved = stats is not None and stats.starved(name)
        gram = group.hessian() if group is not None and group.kind == "hessian" and not starved else None
        norm = None
        if how.method == "wanda" and not starved:
            norm = norm_from_gram(gram) if gram is not None else group.norm()
        hessian = gram if how.method == "sparsegpt" else None
        chosen = how if targets is None else replace(how, sparsity=targets[name])
        return planning.plan_linear(
            name, module, replace(chosen, method="magnitude") if starved else chosen, norm, hessian, gram
        )

    pending: dict[str, tuple[Tensor, Tensor | None]] = {}  # the block's plans until its last pass

    def prune_block(block, stats) -> None:
        # The linears this pass measured (MoE SparseGPT: one bounded group of experts per pass).
        names = [name for name in block.linears if stats is None or stats.measures(name)]
        for name in names:  # on every rank: another rank may plan the linear
            if stats is not None and stats.of(name) is not None and stats.starved(name):
                notes[name] = experts_mod.FALLBACK_NOTE
        # In a process group each rank plans a share of the block's linears (prune.engine.distributed).
        block_plan, block_rows = plan_linears(
            {name: linears[name] for name in names},
            lambda name, module: plan_one(name, module, stats),
            method=how.method,
            progress=False,
        )
        rows.extend(block_rows)
        pending.update(block_plan)
        if stats is not None and not stats.last:
            return  # the block's later passes must run it dense
        for name, (mask, new_weight) in pending.items():  # the whole block planned: now write it
            backup[name] = linears[name].weight.detach().to(host, copy=True)
            planning.write(linears[name], mask, new_weight)
            plan[name] = (mask.cpu(), None if new_weight is None else new_weight.to(host))
        pending.clear()

    try:
        prune_blockwise(
            model,
            steps,
            list(linears),
            prune_block,
            statistic=statistic,
            device=device,
            offload_device=offload_device,
            cache_dir=cache_dir,
            finish_statistics=finish_statistics,
            statistics=ExpertBlockStatistics,
            progress=progress,
        )
        planning.check_written(linears, plan)  # every block is home again: read the weights where they live
    except BaseException:
        planning.restore(linears, backup)
        raise
    result = planning.make_result(plan, write_check.measured_rows(linears, rows), meta)
    experts_mod.annotate(result.report, notes)
    return result
