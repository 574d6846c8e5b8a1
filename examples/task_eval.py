"""Accuracy of a shipped model (dense, pruned from masks, or in memory) on the local lm-eval task.

The demo and the results script share this: it runs ``lm_eval.simple_evaluate`` offline with the
``attnprobe`` model (``prune.evaluation.harness``) on ``examples/tasks/attnprobe_continuation.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TASK = "attnprobe_continuation"


def task_accuracy(
    pretrained: Any,
    *,
    tokenizer: Any = None,
    masks: Path | None = None,
    mc_num: int = 32,
    limit: int | None = None,
    batch_size: int = 64,
    seed: int = 1234,
) -> dict[str, float]:
    """4-way continuation accuracy (chance 0.25) and its standard error over items.

    Args:
        pretrained: a model directory, or a model in memory (then pass ``tokenizer``).
        tokenizer: tokenizer (object or path) for an in-memory model.
        masks: a ``prune.save_masks`` file applied to the loaded checkpoint.
        mc_num: Monte-Carlo draws per choice (diffusion models).
        limit: evaluate only the first ``limit`` items.
        batch_size: rows per forward pass.
        seed: seed of the draws.

    Returns:
        ``{"acc", "acc_stderr", "items"}``.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from prune.evaluation.harness import AttnprobeLM

    lm = AttnprobeLM(
        pretrained=pretrained if not isinstance(pretrained, Path) else str(pretrained),
        tokenizer=tokenizer,
        masks=str(masks) if masks is not None else None,
        mc_num=mc_num,
        batch_size=batch_size,
        seed=seed,
        device="cpu",
    )
    cwd = os.getcwd()
    os.chdir(ROOT)  # the task's data_files are relative to the repository root
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(HERE / "tasks"), include_defaults=False),
            limit=limit,
            verbosity="ERROR",
        )
    finally:
        os.chdir(cwd)
    res = results["results"][TASK]
    items = limit if limit is not None else sum(1 for _ in open(HERE / "tasks" / "continuation.jsonl"))
    return {"acc": float(res["acc,none"]), "acc_stderr": float(res["acc_stderr,none"]), "items": items}
