"""Creating a process group's sharded store: rank 0 lays out the shards, each rank gets its own.

The layout and how it is read are in :mod:`attnprobe.store.shards`. This module is the writing side:
the top manifest (and appended sessions), deleting a sharded store, and waiting for every rank when a
recording closes.
"""

from __future__ import annotations

import logging
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attnprobe import distributed
from attnprobe.store.files import delete_single_store, differing_fields, new_manifest, write_manifest
from attnprobe.store.format import (
    FORMAT,
    MANIFEST,
    SHARDED_LAYOUT,
    SHARDED_SCHEMA_VERSION,
    StoreError,
    is_existing_store,
    is_sharded,
    read_manifest,
    shard_dirname,
)
from attnprobe.store.opening import open_store
from attnprobe.store.shards import ShardedStore

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _top_manifest(world: int, fingerprint: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    base = new_manifest(fingerprint, options)
    return {
        **base,
        "schema_version": SHARDED_SCHEMA_VERSION,
        "format": FORMAT,
        "layout": SHARDED_LAYOUT,
        "world_size": world,
        "sessions": [{"world_size": world, "created": base["created"]}],
        "shards": [{"dir": shard_dirname(0, r), "rank": r, "session": 0} for r in range(world)],
    }


def _prepare(root: Path, world: int, fingerprint, options, overwrite: bool, append: bool) -> list[str]:
    """Rank 0: check ``root``, write (or extend) the top manifest; return every rank's shard dir."""
    if is_existing_store(root):
        manifest = read_manifest(root)
        if append and is_sharded(manifest):
            return _add_session(root, manifest, world, fingerprint, options)
        if append:
            raise ValueError(
                f"{root} holds a store written by one process; a process group of {world} ranks cannot "
                "append to it. Append from one process, or record into a new path."
            )
        if not overwrite:
            count = open_store(root).num_steps
            raise ValueError(
                f"{root} already holds an attnprobe store ({count} steps); pass overwrite=True to "
                "replace it, append=True to add steps to it, or choose another path."
            )
        delete_store(root)
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, _top_manifest(world, fingerprint, options))
    return [shard_dirname(0, r) for r in range(world)]


def _add_session(root: Path, manifest, world: int, fingerprint, options) -> list[str]:
    """Rank 0 of an appending group: add a session of ``world`` shards to the top manifest."""
    existing = ShardedStore(root)
    for what, before, after in (
        ("fingerprint", existing.fingerprint, fingerprint),
        ("options", existing.options, options),
    ):
        keys = differing_fields(before, after)
        if keys:
            raise ValueError(
                f"cannot append to {root / MANIFEST}: its {what} differs in {keys}. Append only recordings "
                "of the same model with the same options, or record into a new path."
            )
    session = len(manifest.get("sessions") or [{}])
    dirs = [shard_dirname(session, r) for r in range(world)]
    manifest.setdefault("sessions", []).append({"world_size": world, "created": _now()})
    manifest["shards"] = [
        *manifest["shards"],
        *({"dir": d, "rank": r, "session": session} for r, d in enumerate(dirs)),
    ]
    write_manifest(root, manifest)
    logger.info("attnprobe: appending session %d (%d ranks) to %s", session, world, root)
    return dirs


def delete_store(root: Path) -> None:
    """Delete a store's own files (a sharded one shard by shard, the top manifest last)."""
    manifest = read_manifest(root)
    if is_sharded(manifest):
        for entry in reversed(manifest["shards"]):
            shard = root / entry["dir"]
            if (shard / MANIFEST).is_file():
                delete_single_store(shard)
            if shard.is_dir() and not any(shard.iterdir()):
                shard.rmdir()
        (root / MANIFEST).unlink()
        return
    delete_single_store(root)


def prepare_shard(
    path: Path, *, fingerprint: dict[str, Any], options: dict[str, Any], overwrite: bool, append: bool
) -> Path:
    """Collective: every rank of the group calls it; returns the directory of this rank's shard.

    Rank 0 checks ``path`` and writes the top manifest listing every rank's shard; the others wait for
    it. The caller then writes its shard as a one-writer store (:class:`attnprobe.store.writer.StoreWriter`).
    """
    world, me = distributed.world_size(), distributed.rank()
    plan: list[str] | BaseException
    if me == 0:
        try:
            plan = _prepare(path, world, fingerprint, options, overwrite, append)
        except (ValueError, OSError) as err:
            plan = err
    else:
        plan = []
    plan = distributed.broadcast_object(plan, src=0)
    if isinstance(plan, BaseException):
        raise plan
    unseen = None
    if not (path / MANIFEST).is_file():  # rank 0 wrote it before the broadcast
        unseen = StoreError(
            f"rank {me} does not see the store manifest rank 0 wrote at {path / MANIFEST}: in a process "
            "group, record into a path on a filesystem every rank sees (or record without a path)."
        )
    distributed.raise_if_any_failed(unseen, "record()")
    return path / plan[me]


def is_sharded_append(path: str | Path, append: bool) -> bool:
    """Appending to a sharded store adds a session of shards, also from one process."""
    try:
        return append and is_sharded(read_manifest(Path(path)))
    except StoreError:
        return False


def wait_for_ranks(path: Path) -> None:
    """At the end of a sharded recording, wait for every rank; warn (not raise) if one never comes."""
    if distributed.world_size() == 1:
        return
    try:
        distributed.barrier()
    except RuntimeError as err:  # a peer died: its completed steps are on disk, as are ours
        warnings.warn(
            f"not every rank reached the end of the recording into {path} ({err}); the store holds the "
            "completed steps of every shard.",
            stacklevel=3,
        )
