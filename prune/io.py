"""Masks on disk: bit-packed boolean masks in a safetensors file, with what made them.

Each mask is stored as ``mask/<module name>``, a uint8 tensor of its bits packed 8 per byte
(little-endian bit order within a byte), eight times smaller than ``torch.bool``. The safetensors
metadata holds ``attnprobe.masks`` (JSON: format version, shapes, pruning settings, model
fingerprint). SparseGPT also changes the kept weights, so ``weights=`` can store them as
``weight/<module name>`` to reproduce the pruned model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

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


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Class and linear shapes of a model: enough to tell whether masks belong to it."""
    return {
        "model_class": type(model).__name__,
        "linears": {
            name: [m.out_features, m.in_features]
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear)
        },
    }


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
        >>> prune.save_masks(result.masks, "masks.safetensors", settings=result.settings,
        ...                  model=model)                                      # doctest: +SKIP
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
    save_file(tensors, str(path), metadata={"attnprobe.masks": json.dumps(header)})
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


@torch.no_grad()
def load_masks(model: nn.Module, path: str | Path, *, check_fingerprint: bool = True) -> dict[str, Any]:
    """Re-apply saved masks (and saved weights, if any) to ``model`` in place.

    Every problem is found before any weight changes: a different model class or fingerprint, a
    missing module, a shape mismatch; the error names each one.

    Args:
        model: a dense model of the architecture the masks were made for.
        path: a file written by :func:`save_masks`.
        check_fingerprint: compare the stored model fingerprint with ``model``'s.

    Returns:
        The header: settings and fingerprint stored with the masks.

    Example:
        >>> prune.load_masks(fresh_model, "masks.safetensors")               # doctest: +SKIP
    """
    masks, weights, header = read_masks(path)
    modules = dict(model.named_modules())
    problems = []
    stored = header.get("fingerprint")
    if check_fingerprint and stored is not None:
        mine = model_fingerprint(model)
        if stored["model_class"] != mine["model_class"]:
            problems.append(f"model class {stored['model_class']} in the file, {mine['model_class']} given")
    for name, mask in masks.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            problems.append(f"{name}: no such nn.Linear in the model")
        elif tuple(module.weight.shape) != tuple(mask.shape):
            problems.append(f"{name}: mask {tuple(mask.shape)} vs weight {tuple(module.weight.shape)}")
    for name, weight in weights.items():
        if name not in masks:
            problems.append(f"{name}: stored weight without a mask")
    if problems:
        raise ValueError(f"masks in {path} do not fit {type(model).__name__}: " + "; ".join(problems))
    for name, mask in masks.items():
        weight = modules[name].weight
        if name in weights:
            weight.copy_(weights[name].to(weight.device, weight.dtype))
        weight.mul_(mask.to(weight.device, weight.dtype))
    return header
