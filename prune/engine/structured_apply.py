"""Structured pruning for :func:`prune.apply` (``pattern="structured"``): Wanda-sp or FLAP scores from the
store's statistics, heads and MLP channels removed physically (:mod:`prune.methods.structured`).
"""

from __future__ import annotations

import logging
import time

from torch import nn

from prune.engine import planning
from prune.engine.statistics import activation_norms

logger = logging.getLogger(__name__)


def apply_structured(
    model, store, ratio, sink_aware, settings, accumulate, mode, meta
) -> planning.PruneResult:
    """Wanda-sp / FLAP structured pruning from the store's activation norms (``prune.methods.structured``).

    Refuses what it cannot honour before computing anything: another method (the score is Wanda's),
    ``sequential=True``, or an architecture without adapters. The report has one row per
    linear whose shape changed: dense → pruned shape, the fraction of its weights removed, and an
    equal share of the total planning + slicing time.
    """
    from prune.methods import structured

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
        planning.finite(name, norm)
    from prune.engine.flap import structured_inputs

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
    return planning.PruneResult(
        masks={}, report=report, settings={**meta, "structured_mode": mode}, plan=plan
    )
