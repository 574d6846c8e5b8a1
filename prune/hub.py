"""Load a checkpoint (hub id or directory) and cut calibration data into windows, for ``attnprobe prune``.

Models load on the CPU in the requested dtype, with SDPA attention where the model lets us choose it;
remote-code DLMs (LLaDA, Dream) register only ``AutoModel``, so that is tried second. Calibration data
is a UTF-8 text file (``.txt``, ``.md``, anything else), JSON lines or a JSON list of records with a
``"text"`` field (``.jsonl``/``.json``), or a safetensors file holding an ``input_ids`` tensor
(``.safetensors``, e.g. ``examples/data/calibration.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` in transformers 5, ``torch_dtype`` before; ``{}``
    for None (the checkpoint's own dtype). The one place that knows the difference."""
    if dtype is None:
        return {}
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {key: dtype}


def checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype a config says its weights are in (float32 when it does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return DTYPES.get(str(value).replace("torch.", ""), torch.float32)


def load_config(name: str, trust_remote_code: bool):
    """The transformers config of ``name`` (reads ``config.json`` only, no weights)."""
    import transformers

    return transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)


def load_pretrained(name: str, dtype: torch.dtype | None, trust_remote_code: bool):
    """The model on the CPU in ``dtype`` (None: the checkpoint's), SDPA where it lets us choose, eval mode."""
    import transformers

    kwargs = {**dtype_kwargs(dtype), "trust_remote_code": trust_remote_code}
    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):  # LLaDA/Dream: AutoModel
        for extra in ({"attn_implementation": "sdpa"}, {}):
            try:
                return auto.from_pretrained(name, **kwargs, **extra).eval()
            except (ValueError, TypeError, KeyError) as err:
                errors.append(f"{auto.__name__}{' (sdpa)' if extra else ''}: {err}")
    raise ValueError(f"could not load {name}: " + "; ".join(errors))


def load_model(name: str, dtype: torch.dtype, trust_remote_code: bool):
    """``(tokenizer, model)`` on the CPU in ``dtype``, in eval mode."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    return tokenizer, load_pretrained(name, dtype, trust_remote_code)


def mask_token_id(model: Any, tokenizer: Any, override: int | None = None) -> int:
    """The mask token: ``override``, else the config's, else the tokenizer's."""
    config = getattr(model, "config", None)
    for candidate in (
        override,
        getattr(config, "mask_token_id", None),
        getattr(tokenizer, "mask_token_id", None),
    ):
        if candidate is not None:
            return int(candidate)
    raise ValueError("no mask token id in the config or tokenizer: pass --mask-token-id (LLaDA: 126336)")


def default_seq_len(config: Any, cap: int = 2048) -> int:
    """The model's context (``max_position_embeddings``), at most ``cap``."""
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def _token_ids(tokenizer: Any, path: Path) -> list[int] | torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "input_ids" not in tensors:
            raise ValueError(f"{path} has no 'input_ids' tensor (keys: {sorted(tensors)})")
        return tensors["input_ids"]
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        records = (
            json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
        )
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in records):
            raise ValueError(f"{path}: every record needs a string 'text' field")
        text = "\n\n".join(r["text"] for r in records)
    else:
        text = path.read_text(encoding="utf-8")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def calibration_windows(tokenizer: Any, path: str | Path, seq_len: int, count: int) -> torch.Tensor:
    """Up to ``count`` consecutive windows of ``seq_len`` tokens, ``(windows, seq_len)`` int64.

    A safetensors ``input_ids`` matrix is cut to ``seq_len`` columns (its rows are the windows).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration file at {path}")
    ids = _token_ids(tokenizer, path)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        if ids.shape[1] < seq_len:
            raise ValueError(f"{path} holds windows of {ids.shape[1]} tokens; pass --seq-len {ids.shape[1]}")
        return ids[:count, :seq_len].long()
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    available = ids.numel() // seq_len
    if available < 1:
        raise ValueError(
            f"{path} has {ids.numel()} tokens: too few for one window of {seq_len}; lower --seq-len or "
            "give more text"
        )
    windows = min(count, available)
    return ids[: windows * seq_len].view(windows, seq_len)
