"""Open a store directory with the reader its layout needs: one writer's store or a process group's shards."""

from __future__ import annotations

from pathlib import Path

from attnprobe.store.format import is_sharded, read_manifest
from attnprobe.store.reader import TrajectoryStore
from attnprobe.store.shards import ShardedStore

__all__ = ["open_store"]


def open_store(path: str | Path) -> TrajectoryStore:
    """Open a trajectory store for reading (exported as ``attnprobe.open``).

    Reads ``manifest.json`` and lists ``steps/``; step files are read only when asked for. A store
    written by a process group (one shard per rank) opens as one
    :class:`~attnprobe.store.shards.ShardedStore`, a ``TrajectoryStore`` over all its shards.

    Args:
        path: the store directory.

    Returns:
        A :class:`TrajectoryStore`.

    Raises:
        StoreError: the path is missing or not a store, its manifest is corrupt or of an unsupported
            schema version, or a step file is missing from the numbering.

    Example:
        >>> store = attnprobe.open("runs/gen")
        >>> store.num_steps, store.step_meta(0)["mask_ratio"]
        (4, 0.5)
    """
    path = Path(path)
    if is_sharded(read_manifest(path)):
        return ShardedStore(path)
    return TrajectoryStore(path)
