"""Writing a trajectory store: one atomic safetensors file per step (format in :mod:`attnprobe.store`).

Files are written atomically (:mod:`attnprobe.store.files`), so a process killed mid-write leaves
either the complete file or a ``.*.tmp`` file that readers ignore and the next writer deletes. The
writer hands out a reader (:attr:`StoreWriter.store`) of what it has written so far; in a process
group it writes this rank's shard (:mod:`attnprobe.store.sharded_writing`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from attnprobe import distributed
from attnprobe.store.files import (
    differing_fields,
    dumps,
    new_manifest,
    normalise,
    remove_temp_files,
    save_tensors,
    unset,
    write_manifest,
)
from attnprobe.store.format import (
    HESSIANS,
    MANIFEST,
    STEPS_DIR,
    StoreError,
    is_existing_store,
    read_manifest,
    step_filename,
    step_indices,
)
from attnprobe.store.opening import open_store
from attnprobe.store.reader import TrajectoryStore
from attnprobe.store.sharded_writing import delete_store, is_sharded_append, prepare_shard, wait_for_ranks
from attnprobe.store.shards import ShardedStore

__all__ = ["StoreWriter", "differing_fields"]

logger = logging.getLogger(__name__)


class StoreWriter:
    """Writes a trajectory store, one atomic file per step; create it with :meth:`create`.

    The writer's :attr:`store` is a :class:`TrajectoryStore` on the same directory that reads every
    completed step while writing goes on (``store.num_steps`` counts them). With ``path=None`` that
    store owns a temporary directory, which lives as long as the store object (see
    :class:`TrajectoryStore`), not merely as long as the writer.

    Example:
        >>> import torch
        >>> writer = StoreWriter.create(None, fingerprint={"layers": ["attn"]}, options={})
        >>> writer.write_step({"mass/0": torch.ones(1, 2, 3)}, {"t": 0.5}, {})
        0
        >>> writer.store.attention_mass(0).shape
        torch.Size([1, 1, 2, 3])
    """

    def __init__(self, store: TrajectoryStore, *, view: TrajectoryStore | None = None) -> None:
        self._store = store  # what this writer writes: the whole store, or this rank's shard
        self._view = view  # in a process group: the whole (sharded) store, read as one
        self._next = store.num_steps
        self._closed = False

    @classmethod
    def create(
        cls,
        path: str | Path | None,
        *,
        fingerprint: dict[str, Any],
        options: dict[str, Any],
        overwrite: bool = False,
        append: bool = False,
        _single: bool = False,
    ) -> StoreWriter:
        """Start a store at ``path`` (a new or empty directory), or replace / extend an existing one.

        Args:
            path: store directory (created with its parents); ``None`` makes a temporary directory
                owned by ``writer.store``, deleted when that object is closed or garbage collected.
            fingerprint: what is recorded (``model_class``, ``layers``, ``heads``, ``linears``).
            options: recording options, kept in the manifest.
            overwrite: delete an existing store at ``path`` (only its manifest, steps and Hessians:
                other files, and directories that are not stores, are never deleted).
            append: add steps after the existing store's last completed step. Its fingerprint and
                options must match these (fields still empty on either side, such as ``layers``
                before the first step, are not compared).

        In a ``torch.distributed`` process group of more than one rank, with a ``path``, this is a
        collective: every rank writes its own shard of one sharded store (:mod:`attnprobe.store.shards`),
        and :attr:`store` reads all of them as one. Appending to a sharded store (from a group or
        from one process) adds a session of shards after the existing ones.

        Returns:
            A :class:`StoreWriter`.

        Raises:
            ValueError: ``path`` holds a store and neither ``overwrite`` nor ``append`` is set, holds
                other files, or (``append``) a store of another model or other options.

        Example:
            >>> w = StoreWriter.create("runs/x", fingerprint={}, options={}, overwrite=True)
            >>> w.write_step({"valid": torch.ones(1, 4, dtype=torch.bool)}, {"t": 0.3}, {})
            0
            >>> w.close(); w.store.num_steps
            1
        """
        if overwrite and append:
            raise ValueError("overwrite=True and append=True exclude each other; pass one of them.")
        fingerprint = normalise(fingerprint, "the store fingerprint")
        options = normalise(options, "the store options")
        group = distributed.world_size() > 1
        if path is not None and not _single and (group or is_sharded_append(path, append)):
            shard_dir = prepare_shard(
                Path(path), fingerprint=fingerprint, options=options, overwrite=overwrite, append=append
            )
            shard = cls.create(shard_dir, fingerprint=fingerprint, options=options, _single=True)
            return cls(shard.store, view=ShardedStore(Path(path), _local=shard.store))
        if path is None:
            tempdir = tempfile.TemporaryDirectory(prefix="attnprobe-", ignore_cleanup_errors=True)
            root = Path(tempdir.name)
            write_manifest(root, new_manifest(fingerprint, options))
            (root / STEPS_DIR).mkdir()
            return cls(TrajectoryStore(root, _tempdir=tempdir))
        root = Path(path)
        if is_existing_store(root):
            try:
                read_manifest(root)
            except StoreError as err:
                raise StoreError(
                    f"{err} (overwrite=True deletes only an attnprobe store with a readable manifest: delete "
                    f"{root} yourself if it is disposable, or choose another path.)"
                ) from None
            if append:
                return cls._append(TrajectoryStore(root), fingerprint, options)
            if not overwrite:
                count = len(step_indices(root / STEPS_DIR)) if (root / STEPS_DIR).is_dir() else None
                count = count if count is not None else open_store(root).num_steps
                raise ValueError(
                    f"{root} already holds an attnprobe store ({count} steps); pass overwrite=True to "
                    "replace it, append=True to add steps to it, or choose another path."
                )
            delete_store(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / STEPS_DIR).mkdir(exist_ok=True)
        write_manifest(root, new_manifest(fingerprint, options))
        return cls(TrajectoryStore(root))

    @classmethod
    def _append(
        cls, existing: TrajectoryStore, fingerprint: dict[str, Any], options: dict[str, Any]
    ) -> StoreWriter:
        old = existing.fingerprint
        checks = (("fingerprint", old, fingerprint), ("options", existing.options, options))
        for what, before, after in checks:
            keys = differing_fields(before, after)
            if keys:
                shown = "; ".join(f"{k}: stored {before[k]!r}, now {after[k]!r}" for k in keys)
                raise ValueError(
                    f"cannot append to {existing.path / MANIFEST}: its {what} differs in {keys} "
                    f"({shown[:500]}). Append only recordings of the same model with the same options, or "
                    "record into a new path."
                )
        remove_temp_files(existing.path)
        writer = cls(existing)
        merged = {**old, **{k: v for k, v in fingerprint.items() if unset(old.get(k))}}
        if merged != old:
            writer.update_fingerprint(**merged)
        logger.info("attnprobe: appending to %s after step %d", existing.path, writer._next - 1)
        return writer

    # -- writing -------------------------------------------------------------------------------------

    @property
    def store(self) -> TrajectoryStore:
        """The store being written, readable at any time (in a process group: every shard, as one)."""
        return self._view if self._view is not None else self._store

    @property
    def shard(self) -> TrajectoryStore:
        """What this writer writes: the whole store, or in a process group this rank's shard."""
        return self._store

    @property
    def path(self) -> Path:
        """The directory this writer writes (in a process group: this rank's shard)."""
        return self._store.path

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                f"the writer of {self.path} is closed; reopen it with StoreWriter.create(..., append=True)."
            )

    def update_fingerprint(self, **fields: Any) -> None:
        """Set fingerprint fields (e.g. ``layers`` once step 0 ran), rewriting the manifest atomically.

        Example:
            >>> writer = StoreWriter.create(None, fingerprint={}, options={})
            >>> writer.update_fingerprint(layers=["model.layers.0.self_attn"])
            >>> writer.store.layers
            ['model.layers.0.self_attn']
        """
        self._check_open()
        manifest = read_manifest(self.path)
        manifest["fingerprint"].update(normalise(fields, "fingerprint fields"))
        write_manifest(self.path, manifest)
        self._store._reload()

    def write_step(
        self, tensors: dict[str, Tensor], meta: dict[str, Any], groups: dict[str, list[str]]
    ) -> int:
        """Write the next step's file atomically and return its index.

        Args:
            tensors: named tensors (layout in docs/DESIGN.md), moved to the CPU and made contiguous.
            meta: JSON-serialisable metadata; ``step`` is set to the index, ``mask_ratio`` defaults to null.
            groups: input group -> names of the linears fed that input.

        Returns:
            The step index.

        Example:
            >>> writer = StoreWriter.create(None, fingerprint={}, options={})
            >>> mass, valid = torch.rand(1, 2, 4), torch.ones(1, 4, dtype=torch.bool)
            >>> writer.write_step({"mass/0": mass, "valid": valid}, {"t": 0.3}, {})
            0
        """
        self._check_open()
        index = self._next
        target = self.path / STEPS_DIR / step_filename(index)
        if target.exists():
            raise RuntimeError(
                f"{target} already exists: another writer is adding steps to this store. Record into a "
                "separate path, one writer per store."
            )
        meta = {"mask_ratio": None, **meta, "step": index}
        metadata = {"meta": dumps(meta, "step metadata"), "groups": dumps(groups, "step groups")}
        save_tensors(target, tensors, metadata)
        self._next = index + 1
        logger.debug("attnprobe: wrote %s", target)
        return index

    def write_hessians(self, tensors: dict[str, Tensor]) -> None:
        """Write ``hessians.safetensors`` (``<g>/plain``, ``<g>/weighted``, ``<g>/nsamples``) atomically.

        Replaces an existing file.

        Example:
            >>> writer = StoreWriter.create(None, fingerprint={}, options={})
            >>> h = torch.eye(3)
            >>> writer.write_hessians({"q/plain": h, "q/weighted": h / 2, "q/nsamples": torch.tensor(4)})
            >>> writer.close(); writer.store.hessians()["q"]["nsamples"]
            tensor(4)
        """
        self._check_open()
        for name in tensors:
            if not isinstance(name, str) or "/" not in name:
                raise ValueError(
                    f"Hessian tensor names must be '<group>/<field>' (e.g. 'q/plain'), got {name!r}"
                )
        save_tensors(self.path / HESSIANS, tensors, None)

    def close(self) -> None:
        """Stop writing (the store stays readable; a temporary one lives as long as :attr:`store`).

        In a process group, closing waits for every rank, so that :attr:`store` then holds every
        shard's steps; a rank that died is reported in a warning.
        """
        if self._closed:
            return
        self._closed = True
        if self._view is not None:
            wait_for_ranks(self._view.path)

    def __repr__(self) -> str:
        return f"StoreWriter({str(self.path)!r}, next_step={self._next}{', closed' if self._closed else ''})"
