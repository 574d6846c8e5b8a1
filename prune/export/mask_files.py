"""Masks on disk: bit-packed boolean masks in a safetensors file, with what made them.

Each mask is stored as ``mask/<module name>``, a uint8 tensor of its bits packed 8 per byte
(little-endian bit order within a byte), eight times smaller than ``torch.bool``. The safetensors
metadata holds ``attnprobe.masks`` (JSON: format version, shapes, pruning settings, model
fingerprint). SparseGPT also changes the kept weights, so ``weights=`` can store them as
``weight/<module name>`` to reproduce the pruned model exactly.

The file is written like the store's files: under a temporary name in its directory, flushed with
``fsync``, then renamed over the target, so a crash leaves the old file or the new one, never half.
The fingerprint (class, linear shapes, a sample of each linear's weights: ``attnprobe``'s
``model_fingerprint``) is checked whole by :func:`load_masks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from attnprobe import atomic_write, expert_weight, fingerprint_problems
from attnprobe import model_fingerprint as _fingerprint

FORMAT_VERSION = 1
_BIT_VALUES = 2 ** torch.arange(8, dtype=torch.uint8)  # bit i of a byte holds element 8·k + i


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor into uint8, 8 elements per byte.

    Example:
        >>> pack_bits(torch.tensor([True, False, True])).tolist()
        [5]
    """
    flat = mask.detach().to("cpu", torch.bool).flatten()
    padded = torch.zeros((flat.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat.to(torch.uint8)
    return (padded.view(-1, 8) * _BIT_VALUES).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`.

    Example:
        >>> unpack_bits(torch.tensor([5], dtype=torch.uint8), (3,)).tolist()
        [True, False, True]
    """
    numel = 1
    for size in shape:
        numel *= size
    bits = (packed[:, None] & _BIT_VALUES) != 0
    return bits.flatten()[:numel].view(shape)


def shown(items: list[str], limit: int = 5) -> str:
    """``a; b; c; and N more``: a list cut to ``limit`` entries for an error message.

    Example:
        >>> shown(["a", "b", "c"], limit=2)
        'a; b; and 1 more'
    """
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Class, shapes and a weight sample of every ``nn.Linear``: whether masks belong to a model."""
    return _fingerprint(model, [name for name, m in model.named_modules() if isinstance(m, nn.Linear)])


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` to a temporary file in ``path``'s directory, fsync, rename over ``path``
    (the store's atomic write, :func:`attnprobe.atomic_write`)."""
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))


def save_masks(
    masks: dict[str, Tensor],
    path: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    model: nn.Module | None = None,
    weights: dict[str, Tensor] | None = None,
) -> Path:
    """Write masks (and optionally pruned weights) to a safetensors file.

    Args:
        masks: ``{module name: bool keep-mask}``, e.g. ``PruneResult.masks``.
        path: destination file.
        settings: how the masks were made (``PruneResult.settings``): stored as metadata.
        model: the model they belong to; its fingerprint is stored and checked by :func:`load_masks`.
        weights: ``{module name: weight}`` to store beside the masks (SparseGPT's reconstructed weights,
            ``PruneResult.weights``).

    Returns:
        The path written.

    Example:
        >>> result = prune.apply(model, "runs/calib", 0.5, progress=False)
        >>> prune.save_masks(result.masks, "masks.safetensors", settings=result.settings, model=model)
        PosixPath('masks.safetensors')
    """
    path = Path(path)
    tensors = {f"mask/{name}": pack_bits(mask) for name, mask in masks.items()}
    for name, weight in (weights or {}).items():
        tensors[f"weight/{name}"] = weight.detach().cpu().contiguous()
    header = {
        "format_version": FORMAT_VERSION,
        "shapes": {name: list(mask.shape) for name, mask in masks.items()},
        "settings": settings or {},
        "fingerprint": model_fingerprint(model) if model is not None else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, path, {"attnprobe.masks": json.dumps(header)})
    return path


def read_masks(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Read ``(masks, weights, header)`` from a file written by :func:`save_masks`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no mask file at {path}; write one with prune.save_masks(result.masks, path)"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "attnprobe.masks" not in meta:
            raise ValueError(
                f"{path} is a safetensors file but not attnprobe masks (no 'attnprobe.masks' metadata)"
            )
        header = json.loads(meta["attnprobe.masks"])
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has mask format {header.get('format_version')}; this version reads {FORMAT_VERSION}"
            )
        masks = {
            name: unpack_bits(f.get_tensor(f"mask/{name}"), tuple(shape))
            for name, shape in header["shapes"].items()
        }
        weights = {key[len("weight/") :]: f.get_tensor(key) for key in f.keys() if key.startswith("weight/")}
    return masks, weights, header


def _fingerprint_problems(model: nn.Module, stored: dict[str, Any], masks, weights, allow_other_weights):
    """Architecture problems, and (unless allowed) linears whose kept weights differ from the file's."""
    # Linears whose weights the file replaces need not match; the others are compared where kept (the
    # saved model was pruned, so its sample is zero where the mask prunes).
    samples = {k: v for k, v in (stored.get("weight_sample") or {}).items() if k not in weights}
    # A fused 3-D expert parameter is skipped when the file replaces any of its slices (<param>.<e>).
    replaced = {name.rpartition(".")[0] for name in weights}
    experts = {k: v for k, v in (stored.get("expert_weight_sample") or {}).items() if k not in replaced}
    problems, differ = fingerprint_problems(
        {**stored, "weight_sample": samples, "expert_weight_sample": experts},
        model,
        check_weights=not allow_other_weights,
        keep=masks,
    )
    if differ:
        problems.append(
            f"the weights of {len(differ)} linear(s) differ from the model the masks were saved from "
            f"({shown(differ)}): another checkpoint (pass allow_other_weights=True to apply them to a "
            "fine-tuned sibling on purpose)"
        )
    return problems


@torch.no_grad()
def load_masks(
    model: nn.Module,
    path: str | Path,
    *,
    check_fingerprint: bool = True,
    allow_other_weights: bool = False,
) -> dict[str, Any]:
    """Re-apply saved masks (and saved weights, if any) to ``model`` in place.

    Every problem is found before any weight changes: a different model class, a missing linear, a
    shape mismatch, other weights (checkpoint); the error names each one.

    Args:
        model: a dense model of the checkpoint the masks were made for.
        path: a file written by :func:`save_masks`.
        check_fingerprint: compare the stored model fingerprint (class, shapes, weight sample) with
            ``model``'s.
        allow_other_weights: accept a model whose weights differ from the saved sample (same class and
            shapes), e.g. a fine-tuned sibling.

    Returns:
        The header: settings and fingerprint stored with the masks.

    Example:
        >>> masks = prune.apply(model, "runs/calib", 0.5, progress=False).masks
        >>> path = prune.save_masks(masks, "masks.safetensors", model=model)
        >>> header = prune.load_masks(model, "masks.safetensors")  # checked against the model, then applied
        >>> float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean())
        0.5
    """
    masks, weights, header = read_masks(path)
    modules = dict(model.named_modules())
    problems = []
    stored = header.get("fingerprint")
    if check_fingerprint and stored is not None:
        problems.extend(_fingerprint_problems(model, stored, masks, weights, allow_other_weights))
    targets = {name: expert_weight(model, name, modules) for name in masks}  # a linear's, or an expert slice
    for name, mask in masks.items():
        if targets[name] is None:
            problems.append(f"{name}: no such nn.Linear (or expert slice <experts>.<param>.<e>) in the model")
        elif tuple(targets[name].shape) != tuple(mask.shape):
            problems.append(f"{name}: mask {tuple(mask.shape)} vs weight {tuple(targets[name].shape)}")
    for name, weight in weights.items():
        if name not in masks:
            problems.append(f"{name}: stored weight without a mask")
    if problems:
        raise ValueError(
            f"masks in {path} do not fit {type(model).__name__}: " + "; ".join(problems) + ". Load them "
            "into the dense model they were made from (or pass check_fingerprint=False to skip the check)."
        )
    for name, mask in masks.items():
        weight = targets[name]
        if name in weights:
            weight.copy_(weights[name].to(weight.device, weight.dtype))
        weight.mul_(mask.to(weight.device, weight.dtype))
    return header
