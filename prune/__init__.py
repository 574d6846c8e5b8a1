"""prune: magnitude, Wanda and SparseGPT pruning of diffusion LMs, baseline and sink-aware.

Example:
    >>> import attnprobe, prune                                                      # doctest: +SKIP
    >>> with attnprobe.record(model, "runs/calib") as store:                        # doctest: +SKIP
    ...     attnprobe.calibrate(model, ids, mask_token_id=126336)
    >>> result = prune.apply(model, store, 0.5, method="wanda", sink_aware=True)   # doctest: +SKIP
    >>> result = prune.apply(model, store, prune.Recipe.load("recipe.yaml"))      # doctest: +SKIP
    >>> prune.save_masks(result.masks, "masks.safetensors", model=model)           # doctest: +SKIP
    >>> prune.save_pretrained(model, "pruned", result, tokenizer=tokenizer)         # doctest: +SKIP

The lm-eval model ``attnprobe`` lives in ``prune.harness`` (optional extra ``eval``; not imported here).
"""

from prune.apply import METHODS, PruneResult, apply
from prune.checkpoint import save_pretrained
from prune.evaluate import EvalResult, evaluate
from prune.io import load_masks, save_masks
from prune.recipe import Recipe
from prune.record_blockwise import record_blockwise
from prune.report_plot import plot_report

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
