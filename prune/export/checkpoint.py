"""``prune.save_pretrained``: pruned models as checkpoints that plain ``from_pretrained`` reloads.

What each pattern writes (``out_dir`` is an ordinary Hugging Face model directory):

- **unstructured / N:M**: the pruned weights as dense safetensors (the zeros are stored), and in
  ``config.json`` a ``sparsity_config`` block with compressed-tensors' keys, for provenance:
  ``format: "dense"``, ``sparsity_structure`` (``"unstructured"``, ``"2:4"``, ...), ``global_sparsity``
  (zero fraction over all parameters, as llm-compressor reports it), ``targets`` (the pruned linears)
  and ``ignore`` (the other linears), with our ``method``, ``sparsity``, ``sink_aware``, ``sink_std``,
  ``sink_alpha``, ``sink_policy`` ... beside them. It is a plain config attribute, not a
  ``quantization_config``, so loading needs neither compressed-tensors nor this package.
- **structured, uniform ratio**: the smaller model. :func:`prune.methods.structured.apply_plan` has already
  written the new ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim`` /
  ``intermediate_size`` into the config, so ``from_pretrained`` builds the pruned shapes.
- **structured, per-layer widths** (``structured_mode="global"``, bias compensation, or architectures
  whose config derives the head size, like LLaDA's ``d_model // n_heads``): a transformers config holds
  one width per kind for all layers and cannot express them. The plan is written to
  ``out_dir/structured_plan.json`` and a ``ValueError`` says how to reload:
  ``apply_plan(from_pretrained(dense), load_plan(path))``.

Every pattern also records the full pruning settings as ``attnprobe_pruning`` in ``config.json``, and
the :class:`prune.Recipe` of the run as ``recipe.yaml`` beside it (``Recipe.load(out_dir)`` reads it).
Remote-code models (``trust_remote_code=True``, e.g. LLaDA) are saved with their code files as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnprobe import expert_weight
from prune.engine.apply import PruneResult

logger = logging.getLogger(__name__)

PLAN_FILE = "structured_plan.json"


def _zero_fraction(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all parameters (tied weights counted once)."""
    zeros = total = 0
    for param in model.parameters():  # .parameters() yields a shared (tied) tensor once
        zeros += int((param == 0).sum())
        total += param.numel()
    return zeros / max(total, 1)


def _check_masks(model: nn.Module, result: PruneResult) -> tuple[list[str], list[str]]:
    """Pruned and other linear names; raises if the masks do not describe this model's weights."""
    modules = dict(model.named_modules())
    linears = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    problems = []
    for name, mask in result.masks.items():
        weight = expert_weight(model, name, modules)  # a linear's, or a fused expert slice's
        if weight is None or tuple(weight.shape) != tuple(mask.shape):
            problems.append(f"{name}: no linear or expert slice of that shape")
        elif bool((weight[~mask.to(weight.device)] != 0).any()):
            problems.append(f"{name}: weights the mask removed are not zero")
    if problems:
        raise ValueError(
            "result does not describe this model (pass the model prune.apply pruned, after it ran): "
            + "; ".join(problems[:5])
        )
    targets = sorted(result.masks)
    return targets, sorted(linears - set(targets))


def sparsity_config(model: nn.Module, result: PruneResult) -> dict[str, Any]:
    """The ``sparsity_config`` block written for unstructured and N:M results.

    Args:
        model: the pruned model.
        result: what :func:`prune.apply` returned for it.

    Returns:
        compressed-tensors' keys (``format``, ``sparsity_structure``, ``global_sparsity``, ``targets``,
        ``ignore``) followed by the pruning method and sink settings.
    """
    targets, ignore = _check_masks(model, result)
    settings = dict(result.settings)
    with torch.no_grad():
        global_sparsity = _zero_fraction(model)
    return {
        "format": "dense",
        "sparsity_structure": settings.get("pattern", "unstructured"),
        "global_sparsity": global_sparsity,
        "targets": targets,
        "ignore": ignore,
        **{k: v for k, v in settings.items() if k not in ("pattern", "recipe")},
    }


def _structured_problem(model: nn.Module, result: PruneResult) -> str | None:
    """Why the config cannot express the pruned widths, or None when it can."""
    from prune.methods.structured_adapters import ADAPTERS, AttentionSpec, find_structures, spec_widths

    if result.plan is not None and result.plan.bias_shift:
        return "bias compensation added output biases that the config says do not exist"
    specs = find_structures(model)
    for kind in (AttentionSpec, None):
        group = [s for s in specs if isinstance(s, AttentionSpec) == (kind is AttentionSpec)]
        if not group:
            continue
        what = "attention heads" if kind else "MLP widths"
        widths = {spec_widths(s) for s in group}
        if len(widths) > 1:
            return f"the {what} differ between layers ({sorted(widths)[:4]} ...)"
        adapter = ADAPTERS[group[0].adapter]
        fields = adapter.head_config if kind else (adapter.width_config,)
        if not fields or None in fields:
            return f"{type(model).__name__}'s config derives its {what} (no config field holds them)"
        config = getattr(model, "config", None)
        if tuple(getattr(config, f, None) for f in fields) != next(iter(widths)):
            return f"the model config's {', '.join(fields)} do not match the pruned {what}"
    return None


def save_pretrained(
    model: nn.Module,
    out_dir: str | Path,
    result: PruneResult,
    tokenizer: Any = None,
    **save_kwargs: Any,
) -> Path:
    """Save a model pruned by :func:`prune.apply` so ``AutoModelForCausalLM.from_pretrained`` reloads it.

    See the module docstring for what each pattern writes. The model itself is not changed (the
    provenance attributes are removed from its config again after saving).

    Args:
        model: the pruned transformers model (anything with ``save_pretrained`` and a ``config``).
        out_dir: the checkpoint directory to write.
        result: the :class:`PruneResult` of that pruning.
        tokenizer: saved beside the model when given (``tokenizer.save_pretrained(out_dir)``).
        **save_kwargs: passed on to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: ``model`` is not a transformers model; ``result`` does not describe it; or the
            structured widths differ per layer (the plan is saved to ``out_dir/structured_plan.json``
            first, and the message says how to reload it).

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> result = prune.apply(model, "runs/calib", 0.5, method="wanda", sink_aware=True, progress=False)
        >>> path = prune.save_pretrained(model, "pruned", result)
        >>> reloaded = AutoModelForCausalLM.from_pretrained("pruned")
        >>> float((reloaded.model.layers[0].mlp.up_proj.weight == 0).float().mean())
        0.5
    """
    config = getattr(model, "config", None)
    if not callable(getattr(model, "save_pretrained", None)) or not hasattr(config, "to_dict"):
        raise ValueError(
            f"{type(model).__name__} is not a transformers PreTrainedModel (no save_pretrained/config), so "
            "from_pretrained could not reload it; save the masks instead: prune.save_masks(result.masks, "
            "path, settings=result.settings, model=model, weights=result.weights)."
        )
    if not isinstance(result, PruneResult):
        raise ValueError(f"result must be the PruneResult of prune.apply, got {type(result).__name__}.")
    out_dir = Path(out_dir)
    settings = dict(result.settings)
    extra: dict[str, Any] = {"attnprobe_pruning": settings}
    if settings.get("pattern") == "structured":
        problem = _structured_problem(model, result)
        if problem is not None:
            from prune.methods.structured import save_plan

            out_dir.mkdir(parents=True, exist_ok=True)
            plan_path = out_dir / PLAN_FILE
            save_plan(result.plan, plan_path)
            raise ValueError(
                f"cannot save this structured pruning as a transformers checkpoint: {problem}. A "
                "transformers config holds one head count and one MLP width for all layers, so "
                "from_pretrained cannot rebuild per-layer widths. "
                f"The plan was saved to {plan_path}; reload with "
                "prune.methods.structured.apply_plan("
                "AutoModelForCausalLM.from_pretrained(DENSE_CHECKPOINT), "
                f"prune.methods.structured.load_plan('{plan_path}')), "
                "or prune with structured_mode='uniform'."
            )
    elif settings.get("pattern") not in ("blocks", "experts"):  # removal: the config already follows
        extra["sparsity_config"] = sparsity_config(model, result)
    for key in extra:
        if hasattr(config, key):
            logger.info("replacing the config's existing %s", key)
    saved = {key: getattr(config, key) for key in extra if hasattr(config, key)}
    try:
        for key, value in extra.items():
            setattr(config, key, value)
        model.save_pretrained(out_dir, **save_kwargs)
    finally:
        for key in extra:
            if key in saved:
                setattr(config, key, saved[key])
            else:
                delattr(config, key)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if getattr(result, "recipe", None) is not None:  # beside the checkpoint, as llm-compressor does
        from prune.recipe import RECIPE_FILE, RecipeError

        try:
            result.recipe.save(out_dir / RECIPE_FILE)
        except RecipeError as err:  # an option given as a Python callable
            logger.warning("%s not written: %s", RECIPE_FILE, err)
    return out_dir
