"""prune: magnitude, Wanda and SparseGPT pruning of diffusion LMs, baseline and sink-aware.

Example:
    >>> import attnprobe, prune
    >>> with attnprobe.record(model, "runs/demo") as store:
    ...     n = attnprobe.calibrate(model, ids, mask_token_id=259, steps=4, sample_interval=2, progress=False)
    >>> result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True, progress=False)
    >>> result.recipe == prune.Recipe(method="wanda", sparsity=0.5, sink_aware=True)  # the run as data
    True
    >>> round(float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()), 3)
    0.5
    >>> prune.save_masks(result.masks, "masks.safetensors", model=model)
    PosixPath('masks.safetensors')
    >>> checkpoint = prune.save_pretrained(model, "pruned", result)

The lm-eval model ``attnprobe`` lives in ``prune.evaluation.harness`` (optional extra ``eval``; not
imported here).

Subpackages (docs/DESIGN.md): ``methods`` (scores and masks, pure), ``engine`` (one-shot, block-wise,
onloading, process groups, MoE glue), ``export`` (mask files, checkpoints), ``evaluation`` (NLL, lm-eval).
"""

import sys as _sys

from attnprobe import alias_moved_modules
from prune.engine.apply import METHODS, PruneResult, apply
from prune.engine.record_blockwise import record_blockwise
from prune.evaluation.evaluate import EvalResult, evaluate
from prune.export.checkpoint import save_pretrained
from prune.export.mask_files import load_masks, save_masks
from prune.export.report_plot import plot_report
from prune.recipe import Recipe

# Old flat module paths (before the subpackages), kept for one release with a DeprecationWarning.
alias_moved_modules(
    _sys.modules[__name__],
    {
        "apply": "prune.engine.apply",
        "store_checks": "prune.engine.store_checks",
        "statistics": "prune.engine.statistics",
        "blockwise": "prune.engine.blockwise",
        "block_stats": "prune.engine.block_stats",
        "block_experts": "prune.engine.block_experts",
        "onload": "prune.engine.onload",
        "distributed": "prune.engine.distributed",
        "experts": "prune.engine.experts",
        "coverage": "prune.engine.coverage",
        "record_blockwise": "prune.engine.record_blockwise",
        "wanda": "prune.methods.wanda",
        "sparsegpt": "prune.methods.sparsegpt",
        "masks": "prune.methods.masks",
        "structured": "prune.methods.structured",
        "structured_adapters": "prune.methods.structured_adapters",
        "io": "prune.export.mask_files",
        "checkpoint": "prune.export.checkpoint",
        "evaluate": "prune.evaluation.evaluate",
        "harness": "prune.evaluation.harness",
    },
)

__all__ = [
    "METHODS",
    "EvalResult",
    "PruneResult",
    "Recipe",
    "apply",
    "evaluate",
    "load_masks",
    "plot_report",
    "record_blockwise",
    "save_masks",
    "save_pretrained",
]
