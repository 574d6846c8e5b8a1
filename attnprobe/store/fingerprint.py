"""What a store (or a mask file) was recorded from, and whether a model is that model.

A fingerprint holds the model class, each block linear's shape and a *weight sample*: a few strided
entries of each linear's weight, taken when the recording starts. Fused experts keep their weights in
3-D parameters ``(experts, out, in)`` (:mod:`attnprobe.layout.experts`), not in ``nn.Linear``s: each such
parameter gets its own strided sample with its shape (``expert_weight_sample``; stores written before
it have none and compare linears only). Shapes tell architectures apart;
the sample tells checkpoints of one architecture apart (a store recorded from the base model is
refused for a fine-tuned sibling unless the caller says ``allow_other_weights=True``).

The sample is compared after casting both sides to the coarser of the two dtypes, so a checkpoint
loaded in bfloat16 matches the same checkpoint recorded in float32 (casting rounds to nearest), while
a weight changed by more than the coarser dtype's precision does not match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnprobe.layout import experts as moe

WEIGHT_SAMPLES = 16  # entries sampled per linear: enough to catch any real fine-tune, cheap to store


def _flat_positions(numel: int, count: int = WEIGHT_SAMPLES) -> Tensor:
    """Flat indices of the midpoints of ``count`` equal strides of ``numel`` entries."""
    count = min(count, numel)
    return ((2 * torch.arange(count, dtype=torch.int64) + 1) * numel) // (2 * count)


def sample_positions(shape: tuple[int, int], count: int = WEIGHT_SAMPLES) -> tuple[Tensor, Tensor]:
    """Rows and columns of the sampled entries of a ``(out, in)`` weight: midpoints of ``count`` strides.

    Example:
        >>> rows, cols = sample_positions((4, 4), 4)
        >>> list(zip(rows.tolist(), cols.tolist()))
        [(0, 2), (1, 2), (2, 2), (3, 2)]
    """
    flat = _flat_positions(shape[0] * shape[1], count)
    return flat // shape[1], flat % shape[1]


def weight_sample(weight: Tensor) -> dict[str, Any] | None:
    """The sampled entries of a 2-D weight as ``{"dtype": str, "values": [float]}``; None if unreadable.

    A weight on the ``meta`` device (offloaded, not materialised) has no values to sample.

    Example:
        >>> weight_sample(torch.arange(8.0).view(2, 4))["values"][:3]
        [0.0, 1.0, 2.0]
    """
    if weight.dim() != 2 or weight.device.type == "meta" or weight.numel() == 0:
        return None
    rows, cols = sample_positions(tuple(weight.shape))
    values = weight.detach()[rows.to(weight.device), cols.to(weight.device)]
    return {"dtype": str(weight.dtype).removeprefix("torch."), "values": values.float().cpu().tolist()}


def expert_sample(param: Tensor) -> dict[str, Any] | None:
    """Shape, dtype and strided entries of a 3-D (fused experts) parameter; None if it has no values.

    The entries are gathered by index, so a parameter of many GiB is never copied or made contiguous.

    Example:
        >>> expert_sample(torch.arange(8.0).view(2, 2, 2))["values"][:3]
        [0.0, 1.0, 2.0]
    """
    if param.dim() != 3 or param.device.type == "meta" or param.numel() == 0:
        return None
    index = torch.unravel_index(_flat_positions(param.numel()).to(param.device), tuple(param.shape))
    values = param.detach()[index]
    return {
        "shape": list(param.shape),
        "dtype": str(param.dtype).removeprefix("torch."),
        "values": values.float().cpu().tolist(),
    }


def fused_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s 3-D floating-point parameters: the fused expert weights.

    Example:
        >>> fused_parameters(nn.Sequential(nn.Linear(4, 2)))
        []
    """
    return [n for n, p in model.named_parameters() if p.dim() == 3 and p.is_floating_point()]


def model_fingerprint(model: nn.Module, linears: list[str], fused: list[str] | None = None) -> dict[str, Any]:
    """Class, linear shapes and weight samples of ``model``'s named linears and fused expert weights.

    Args:
        model: the model.
        linears: names of the ``nn.Linear`` modules to describe.
        fused: names of the 3-D parameters to sample; default :func:`fused_parameters` (all of them).

    Example:
        >>> sorted(model_fingerprint(nn.Sequential(nn.Linear(4, 2)), ["0"]))
        ['expert_weight_sample', 'linears', 'model_class', 'weight_sample']
    """
    modules = dict(model.named_modules())
    samples = {}
    for name in linears:
        sample = weight_sample(modules[name].weight)
        if sample is not None:
            samples[name] = sample
    params = dict(model.named_parameters())
    experts = {}
    for name in fused_parameters(model) if fused is None else fused:
        sample = expert_sample(params[name])
        if sample is not None:
            experts[name] = sample
    return {
        "model_class": type(model).__name__,
        "linears": {name: [modules[name].out_features, modules[name].in_features] for name in linears},
        "weight_sample": samples,
        "expert_weight_sample": experts,
    }


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _same_weights(stored: dict[str, Any], weight: Tensor, keep: Tensor | None) -> bool:
    """Whether ``weight``'s sample matches ``stored`` (only where the ``(out, in)`` mask ``keep`` is True)."""
    if keep is not None:
        if tuple(keep.shape) != tuple(weight.shape):
            return False
        rows, cols = sample_positions(tuple(keep.shape))
        keep = keep.to("cpu", torch.bool)[rows, cols]
    return _same_values(stored, weight_sample(weight), weight.dtype, keep)


def _same_values(stored: dict[str, Any], mine: dict[str, Any] | None, dtype, keep: Tensor | None) -> bool:
    """Whether two samples agree in the coarser dtype (only at positions where ``keep`` is True)."""
    if mine is None or len(mine["values"]) != len(stored.get("values", [])):
        return mine is None  # nothing to compare on a meta weight; a different count is a different shape
    coarse = max(_dtype(stored.get("dtype", "float32")), dtype, key=lambda d: torch.finfo(d).eps)
    a = torch.tensor(stored["values"], dtype=torch.float32).to(coarse).float()
    b = torch.tensor(mine["values"], dtype=torch.float32).to(coarse).float()
    # One unit of the coarse dtype's precision absorbs double rounding (float16 vs bfloat16).
    close = torch.isclose(a, b, rtol=torch.finfo(coarse).eps, atol=torch.finfo(coarse).tiny)
    return bool(close[keep].all() if keep is not None else close.all())


def _expert_keep(name: str, shape: tuple[int, int, int], keep: dict[str, Tensor]) -> Tensor | None:
    """Which sampled entries of 3-D ``name`` are kept, from the ``(out, in)`` masks of its slices.

    A slice is ``<name>.<e>`` (:func:`attnprobe.layout.experts.expert_weight`); a slice without a mask keeps
    every entry, a mask of another shape keeps none (the comparison then finds a difference).
    """
    if not any(k.startswith(f"{name}.") for k in keep):
        return None
    experts, rows, cols = torch.unravel_index(_flat_positions(shape[0] * shape[1] * shape[2]), shape)
    kept = []
    for e, r, c in zip(experts.tolist(), rows.tolist(), cols.tolist()):
        mask = keep.get(f"{name}.{e}")
        if mask is None:
            kept.append(True)
        else:
            kept.append(tuple(mask.shape) == shape[1:] and bool(mask[r, c]))
    return torch.tensor(kept, dtype=torch.bool)


def _expert_problems(stored: dict[str, Any], model: nn.Module) -> list[str]:
    params = dict(model.named_parameters())
    problems = []
    for name, sample in stored.items():
        param = params.get(name)
        if param is None or param.dim() != 3:
            problems.append(f"{name} missing")
        elif list(param.shape) != list(sample.get("shape", [])):
            problems.append(f"{name} shape {list(sample.get('shape', []))} vs {list(param.shape)}")
    return problems


def _expert_differ(stored: dict[str, Any], model: nn.Module, keep: dict[str, Tensor]) -> list[str]:
    params = dict(model.named_parameters())
    differ = []
    for name, sample in stored.items():
        param = params[name]
        mask = _expert_keep(name, tuple(param.shape), keep)
        if not _same_values(sample, expert_sample(param), param.dtype, mask):
            differ.append(name)
    return differ


def fingerprint_problems(
    stored: dict[str, Any],
    model: nn.Module,
    *,
    check_weights: bool = True,
    keep: dict[str, Tensor] | None = None,
) -> tuple[list[str], list[str]]:
    """Compare a stored fingerprint with ``model``.

    Args:
        stored: a fingerprint as :func:`model_fingerprint` made it (older stores lack ``weight_sample``).
        model: the model to check.
        check_weights: compare weight samples too.
        keep: per linear (or fused expert slice ``<param>.<e>``), a bool ``(out, in)`` keep-mask: only
            kept entries are compared (a pruned model's sample is zero where it was pruned); linears
            absent compare every sampled entry.

    Returns:
        ``(architecture problems, linears and fused expert parameters whose weights differ)``; both empty
        when ``model`` matches.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 2))
        >>> fingerprint_problems(model_fingerprint(m, ["0"]), m)
        ([], [])
    """
    problems = []
    if stored.get("model_class") not in (None, type(model).__name__):
        problems.append(f"model class {stored.get('model_class')} recorded, {type(model).__name__} given")
    modules = dict(model.named_modules())
    for name, shape in (stored.get("linears") or {}).items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            problems.append(f"{name} missing")
        elif [module.out_features, module.in_features] != list(shape):
            problems.append(f"{name} shape {list(shape)} vs {[module.out_features, module.in_features]}")
    experts = stored.get("expert_weight_sample") or {}  # absent in stores written before it existed
    problems += _expert_problems(experts, model)
    differ = []
    if check_weights and not problems:
        for name, sample in (stored.get("weight_sample") or {}).items():
            module = modules.get(name)
            mask = (keep or {}).get(name)
            if isinstance(module, nn.Linear) and not _same_weights(sample, module.weight, mask):
                differ.append(name)
        differ += _expert_differ(experts, model, keep or {})
    return problems, differ


def store_fingerprint(model: nn.Module, linears: list[str], experts: list) -> dict[str, Any]:
    """What a store records about its model: :func:`model_fingerprint` plus its expert layers, if any.

    One definition for every writer of a store (:func:`attnprobe.record`, the block-wise mass pass), so
    ``prune`` checks the same fields whichever wrote it. ``experts``: the
    :class:`~attnprobe.layout.experts.ExpertSet` list of the model (empty for a dense model).
    """
    return {
        **model_fingerprint(model, linears),
        **({"experts": moe.fingerprint(experts)} if experts else {}),
    }
