"""One logical trajectory store written by a process group: one shard per rank, read as one.

Layout (schema version 2; each shard is a complete schema-1 store, see docs/DESIGN.md)::

    <store>/manifest.json            layout "sharded", world_size, sessions, shards (dir, rank, session)
    <store>/rank-00000/              rank 0's steps and Hessians, written by rank 0 alone
    <store>/rank-00001/
    <store>/append-001-rank-00000/   an appended session (any world size) adds its own shards

Writing: rank 0 checks the path and writes the top manifest, listing every rank's shard; the other
ranks wait for it (one collective when the recording starts) and then each writes only its own
shard, atomically per step as a single process does. No collective runs while steps are recorded,
so a rank that dies leaves the completed steps of every shard readable; a shard whose rank died
before creating it reads as empty. When the recording closes, the ranks wait for each other (a rank
that never arrives is reported in a warning, not an error).

Reading (:class:`ShardedStore`): step ``g`` of the whole store is step ``g - offset`` of one shard,
shards taken in manifest order (session by session, rank by rank). Since
:func:`attnprobe.calibrate` gives rank r the r-th contiguous share of the batches, this is the order
one process records the same windows in. Sums combine exactly (up to summation order): Hessians are
the sum of the shards' Hessians; per-step statistics are read step by step as from one store.
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from attnprobe.store.format import (
    MANIFEST,
    SHARDED_SCHEMA_VERSION,
    StoreError,
    is_sharded,
    read_manifest,
)
from attnprobe.store.reader import TrajectoryStore

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

_UNSET = (None, [], {}, "")  # a field not known yet (layers before a shard's first step)


class ShardedStore(TrajectoryStore):
    """Reads a process group's shards as one store (open it with ``attnprobe.open(path)``).

    Everything a :class:`~attnprobe.store.TrajectoryStore` reads works the same, over the steps of
    all shards: ``num_steps`` is the total, step ``g`` is found in the shard that holds it, and
    :meth:`hessians` sums the shards. :meth:`step_meta` adds ``rank``, ``session`` and ``shard_step``;
    :meth:`to_pandas` has a ``rank`` column.

    Example (not run here: it needs a store recorded by a process group, as in
    ``tests/distributed``)::

        >>> store = attnprobe.open("runs/calib-ddp")          # doctest: +SKIP
        >>> store.world_size, store.num_steps                 # doctest: +SKIP
        (2, 640)
    """

    def __init__(self, path: str | Path, *, _local: TrajectoryStore | None = None) -> None:
        self._path = Path(path)
        self._tempdir = None
        self._local = _local  # the shard this process writes, if any: its fingerprint is authoritative
        self._headers = {}
        self._shards: dict[str, TrajectoryStore] = {}
        self._offsets: list[int] = [0]
        self._entries: list[dict[str, Any]] = []
        self._count = 0
        self._reload()
        self._refresh()

    # -- manifest and shards -------------------------------------------------------------------------

    def _reload(self) -> None:
        manifest = read_manifest(self._path)
        if not is_sharded(manifest):
            raise StoreError(f"{self._path} is not a sharded store; open it with attnprobe.open(path).")
        self._manifest = manifest
        self._manifest_stamp = self._stamp()
        self._entries = list(manifest["shards"])

    def _shard(self, entry: dict[str, Any]) -> TrajectoryStore | None:
        """The shard's reader, or None while its rank has not created it (or died before)."""
        directory = entry["dir"]
        if directory not in self._shards:
            if self._local is not None and self._local.path == self._path / directory:
                self._shards[directory] = self._local
            elif (self._path / directory / MANIFEST).is_file():
                self._shards[directory] = TrajectoryStore(self._path / directory)
            else:
                return None
        return self._shards[directory]

    def _refresh(self) -> int:
        if self._stamp() != self._manifest_stamp:
            self._reload()
        offsets = [0]
        for entry in self._entries:
            shard = self._shard(entry)
            offsets.append(offsets[-1] + (shard.num_steps if shard is not None else 0))
        self._offsets = offsets
        self._count = offsets[-1]
        return self._count

    def _locate(self, step: int) -> tuple[TrajectoryStore, int, dict[str, Any]]:
        """The shard holding global step ``step``, the step's index in it, and the shard's entry."""
        step = self._check_step(step)
        if step >= self._offsets[-1]:
            self._refresh()
        i = bisect.bisect_right(self._offsets, step) - 1
        shard = self._shard(self._entries[i])
        return shard, step - self._offsets[i], self._entries[i]

    @property
    def world_size(self) -> int:
        """World size of the process group that created the store (its first session)."""
        return int(self._current_manifest().get("world_size", len(self._entries)))

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Per shard, in step order: ``dir``, ``rank``, ``session``, ``num_steps`` (None if absent)."""
        self._refresh()
        return [
            {**entry, "num_steps": None if self._shard(entry) is None else self._shard(entry).num_steps}
            for entry in self._entries
        ]

    def _present(self) -> list[TrajectoryStore]:
        return [s for s in (self._shard(e) for e in self._entries) if s is not None]

    def _merged(self, key: str) -> dict[str, Any]:
        """``fingerprint`` or ``options``: this process's shard, else the first shard that set each field."""
        if self._local is not None:
            return getattr(self._local, key)
        merged = dict(self._current_manifest().get(key) or {})
        seen_in: dict[str, Path] = {}
        for shard in self._present():
            for field, value in getattr(shard, key).items():
                if value in _UNSET:
                    continue
                if merged.get(field) in _UNSET or field not in seen_in:
                    merged[field], seen_in[field] = value, shard.path
                elif merged[field] != value:
                    raise StoreError(
                        f"the shards of {self._path} disagree on {key} field {field!r} "
                        f"({seen_in[field].name} vs {shard.path.name}): they were recorded from different "
                        "models or options. Open "
                        "each shard alone with attnprobe.open(path / shard_dir), or record again."
                    )
        return merged

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self._merged("fingerprint")

    @property
    def options(self) -> dict[str, Any]:
        return self._merged("options")

    @property
    def layers(self) -> list[str]:
        return list(self.fingerprint.get("layers") or [])

    @property
    def schema_version(self) -> int:
        return SHARDED_SCHEMA_VERSION

    # -- steps: each read goes to the shard that holds the step --------------------------------------

    def _open(self, step: int):
        shard, local, _ = self._locate(step)
        return shard._open(local)

    def _header(self, step: int, handle: Any | None = None):
        shard, local, _ = self._locate(step)
        return shard._header(local, handle)

    def _read(self, step: int, select: Any) -> dict[str, Tensor]:
        shard, local, _ = self._locate(step)
        return shard._read(local, select)

    def valid(self, step: int) -> Tensor:
        shard, local, _ = self._locate(step)
        return shard.valid(local)

    def step_meta(self, step: int) -> dict[str, Any]:
        """The step's metadata; ``step`` is the global index, plus ``rank``, ``session``, ``shard_step``."""
        shard, local, entry = self._locate(step)
        meta = shard.step_meta(local)
        meta.update(step=int(step), shard_step=local, rank=entry.get("rank"), session=entry.get("session"))
        return meta

    def rank_of(self, step: int) -> int:
        """The rank that recorded global step ``step``."""
        return int(self._locate(step)[2].get("rank", 0))

    def hessians(self) -> dict[str, dict[str, Tensor]] | None:
        """``XᵀX`` per input group summed over the shards that wrote one (``nsamples`` summed too)."""
        total: dict[str, dict[str, Tensor]] | None = None
        for shard in self._present():
            part = shard.hessians()
            if part is None:
                continue
            if total is None:
                total = part
                continue
            for group, tensors in part.items():
                mine = total.setdefault(group, {})
                for field, tensor in tensors.items():
                    mine[field] = mine[field] + tensor if field in mine else tensor
        return total

    def to_pandas(self, steps=None, layers=None, *, aggregate: str | None = None) -> pd.DataFrame:
        """As :meth:`TrajectoryStore.to_pandas`, with a ``rank`` column after ``step``."""
        table = super().to_pandas(steps, layers, aggregate=aggregate)
        ranks = {step: self.rank_of(step) for step in table["step"].unique().tolist()}
        table.insert(1, "rank", table["step"].map(ranks).astype("int64"))
        return table

    def close(self) -> None:
        for shard in self._shards.values():
            if shard is not self._local:
                shard.close()
        self._shards.clear()

    def __repr__(self) -> str:
        base = super().__repr__()
        try:
            extra = f", world_size={self.world_size}, shards={len(self._entries)}"
        except (StoreError, OSError):
            extra = ""
        return base.replace("TrajectoryStore(", "ShardedStore(", 1)[:-1] + extra + ")"


# -- writing -----------------------------------------------------------------------------------------
