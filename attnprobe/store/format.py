"""The trajectory store's on-disk format, shared by the reader (``store``), the writer (``store_writer``)
and the sharded layout (``shards``): names, versions, and reading and checking a manifest.

Two layouts (docs/DESIGN.md "Store layout")::

    single process (schema 1)             process group (schema 2, layout "sharded")
    <store>/manifest.json                 <store>/manifest.json     world_size, sessions, shards
    <store>/steps/000000.safetensors      <store>/rank-00000/       a complete schema-1 store per rank
    <store>/hessians.safetensors          <store>/rank-00001/       ...
                                          <store>/append-001-rank-00000/   a later (appended) session
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

FORMAT = "attnprobe-trajectory-store"
SCHEMA_VERSION = 1  # one writer: manifest + steps/ (+ hessians)
SHARDED_SCHEMA_VERSION = 2  # one shard (a schema-1 store) per rank of a process group
SUPPORTED_SCHEMA_VERSIONS = (SCHEMA_VERSION, SHARDED_SCHEMA_VERSION)
SHARDED_LAYOUT = "sharded"
MANIFEST = "manifest.json"
STEPS_DIR = "steps"
HESSIANS = "hessians.safetensors"
LINEAR_STAT_FIELDS = ("sumsq", "wsumsq", "cand_rows")
HESSIAN_FIELDS = ("plain", "weighted", "nsamples")

STEP_FILE = re.compile(r"^(\d{6})\.safetensors$")
TEMP_FILE = re.compile(r"^\..+\.tmp$")  # what an interrupted atomic write leaves behind


class StoreError(ValueError):
    """A path that is not a trajectory store, or a store whose files are missing, corrupt or unreadable."""


def step_filename(index: int) -> str:
    """Name of step ``index``'s file inside ``steps/``, e.g. ``000003.safetensors``."""
    return f"{index:06d}.safetensors"


def shard_dirname(session: int, rank: int) -> str:
    """Directory of ``rank``'s shard in recording session ``session`` (0 first, then each append).

    Example:
        >>> shard_dirname(0, 1), shard_dirname(2, 0)
        ('rank-00001', 'append-002-rank-00000')
    """
    return f"rank-{rank:05d}" if session == 0 else f"append-{session:03d}-rank-{rank:05d}"


def step_indices(steps: Path) -> list[int]:
    """Sorted indices of the step files in ``steps`` (temporary files and other names ignored)."""
    try:
        names = os.listdir(steps)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StoreError(f"cannot list {steps}: {err}; check its permissions.") from None
    return sorted(int(m.group(1)) for m in map(STEP_FILE.match, names) if m)


def is_sharded(manifest: dict[str, Any]) -> bool:
    """Whether a checked manifest describes the sharded (process-group) layout."""
    return manifest.get("layout") == SHARDED_LAYOUT


def is_existing_store(root: Path) -> bool:
    """True if ``root`` is a non-empty store directory; refuse a file or a directory of other files.

    Checked before any write, so attnprobe never writes into (or, with ``overwrite=True``, deletes)
    a directory it did not create.
    """
    if root.exists() and not root.is_dir():
        raise ValueError(f"cannot record into {root}: it is a file. Choose a directory path.")
    if not (root.is_dir() and any(root.iterdir())):
        return False
    if not (root / MANIFEST).exists():
        raise ValueError(
            f"{root} is not empty and is not an attnprobe store (no {MANIFEST}); attnprobe never "
            "writes into or deletes other files, even with overwrite=True. Choose a new or empty "
            "directory."
        )
    return True


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check ``path/manifest.json``, raising :class:`StoreError` that says what is wrong."""
    hint = f"record one with attnprobe.record(model, {str(path)!r})"
    if not path.exists():
        raise StoreError(f"no attnprobe store at {path}: the path does not exist; {hint}.")
    if not path.is_dir():
        raise StoreError(f"{path} is not an attnprobe store: it is a file, not a directory; {hint}.")
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(f"{path} is not an attnprobe store (no {MANIFEST}); {hint}.")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise StoreError(f"cannot read {file}: {err}; check its permissions.") from None
    except json.JSONDecodeError as err:
        raise StoreError(
            f"{file} is not valid JSON ({err}); the store's manifest is corrupt: restore it from a "
            "backup or record the store again."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(
            f"{file} is not an attnprobe manifest (format {found!r}, expected {FORMAT!r}); {path} is "
            f"not an attnprobe store; {hint}."
        )
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise StoreError(
            f"{file} has schema_version {version!r}; this attnprobe reads schema version(s) "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}: upgrade attnprobe to read this store."
        )
    if (version == SHARDED_SCHEMA_VERSION) != is_sharded(manifest):
        raise StoreError(
            f"{file}: schema_version {version} does not match layout {manifest.get('layout')!r}; the "
            "manifest is corrupt: record the store again."
        )
    if is_sharded(manifest):
        shards = manifest.get("shards")
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("dir"), str) and "/" not in s["dir"] for s in shards
        ):
            raise StoreError(f"{file}: 'shards' must be a list of {{'dir', 'rank', 'session'}}; corrupt.")
        return manifest
    for key in ("fingerprint", "options"):
        if not isinstance(manifest.get(key, {}), dict):
            raise StoreError(f"{file}: {key!r} must be a JSON object; the manifest is corrupt.")
        manifest.setdefault(key, {})
    return manifest


def read_single_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a one-writer store; a sharded store's is refused with the way to open it."""
    manifest = read_manifest(path)
    if is_sharded(manifest):
        raise StoreError(
            f"{path} is a sharded store written by a process group ({len(manifest['shards'])} shards); "
            "open it with attnprobe.open(path), which reads the shards as one store."
        )
    return manifest
