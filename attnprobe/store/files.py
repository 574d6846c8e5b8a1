"""The store's files on disk: atomic writes, the manifest, and deleting a store's own files.

Every file is written under a hidden temporary name in its final directory, flushed with ``fsync``,
then renamed over its final name with ``os.replace`` (atomic on POSIX and Windows), so a process killed
mid-write leaves either the complete file or a ``.*.tmp`` file that readers ignore and the next writer
deletes. Used by the writer of one store and of a process group's shards alike.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from attnprobe.store.format import FORMAT, HESSIANS, MANIFEST, SCHEMA_VERSION, STEP_FILE, STEPS_DIR, TEMP_FILE
from attnprobe.version import __version__

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: 0-dim tensors and numpy scalars become numbers, small tensors lists."""
    if isinstance(value, Tensor) or hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, default=_jsonable)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must be JSON-serialisable ({err}); pass numbers, strings, lists and dicts "
            "(e.g. t=float(t), not a tensor of several values)."
        ) from None


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (not possible, and not needed, on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Any) -> None:
    """Call ``write(temp_path)``, fsync the temp file, then ``os.replace`` it onto ``target``."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def save_tensors(target: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> None:
    """Write ``tensors`` atomically to ``target``: on the CPU, contiguous, not sharing memory."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names written to {target} must be non-empty strings, got {name!r}")
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"{name!r} written to {target} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        t = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (views of one buffer): give each its own.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        out[name] = t
    atomic_write(target, lambda temp: save_file(out, temp, metadata=metadata))


def normalise(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), checking it is serialisable."""
    return json.loads(dumps(value, what))


def differing_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys set (non-empty) on both sides with different values."""
    both = old.keys() & new.keys()
    return sorted(k for k in both if not unset(old[k]) and not unset(new[k]) and old[k] != new[k])


def unset(value: Any) -> bool:
    """A fingerprint field not known yet (``layers`` before the first step)."""
    return value is None or value == [] or value == {} or value == ""


def remove_temp_files(path: Path) -> None:
    for directory in (path, path / STEPS_DIR):
        if directory.is_dir():
            for entry in directory.iterdir():
                if TEMP_FILE.match(entry.name) and entry.is_file():
                    logger.info("attnprobe: removing %s left by an interrupted write", entry)
                    entry.unlink(missing_ok=True)


def new_manifest(fingerprint: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 manifest for a new store (also the base of a sharded store's top manifest)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "attnprobe_version": __version__,
        "fingerprint": fingerprint,
        "options": options,
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``root/manifest.json`` atomically."""
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(root / MANIFEST, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def delete_single_store(root: Path) -> None:
    """Delete a one-writer store's own files; the manifest last, so an interruption leaves a store."""
    logger.info("attnprobe: overwriting the store at %s", root)
    remove_temp_files(root)
    steps = root / STEPS_DIR
    if steps.is_dir():
        for entry in sorted(steps.iterdir(), reverse=True):  # last step first: no gaps meanwhile
            if STEP_FILE.match(entry.name):
                entry.unlink()
        if not any(steps.iterdir()):
            steps.rmdir()
    (root / HESSIANS).unlink(missing_ok=True)
    (root / MANIFEST).unlink()
