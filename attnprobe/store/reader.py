"""On-disk trajectory store: one safetensors file per completed step, written atomically, read lazily.

Layout (schema version 1, see docs/DESIGN.md "Store layout")::

    <store>/manifest.json                 schema_version, format, created, attnprobe_version,
                                          fingerprint, options
    <store>/steps/000000.safetensors      one file per completed step
    <store>/hessians.safetensors          only with hessians=True, written when the recording closes

Files are written atomically (:mod:`attnprobe.store.files`); readers ignore the ``.*.tmp`` files an
interrupted write leaves. Steps are numbered contiguously from 0: ``num_steps`` counts step files.

Laziness: :func:`open_store` reads only ``manifest.json`` and lists ``steps/``; a step file is opened
(with :func:`safetensors.safe_open`, which reads just the requested tensors) only when one of its
tensors or its metadata is asked for. Step headers are kept in a small LRU cache.

One writer per store at a time; any number of readers, also in other processes, while it writes.
A process group writes one such store per rank under one directory (schema version 2, read as one
store by :mod:`attnprobe.store.shards`); the format's names and versions live in
:mod:`attnprobe.store.format`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from attnprobe.store.format import (
    HESSIANS,
    MANIFEST,
    STEPS_DIR,
    StoreError,
    read_single_manifest,
    step_filename,
    step_indices,
)
from attnprobe.store.tables import mass_table

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

_HEADER_CACHE = 128
__all__ = ["StoreError", "TrajectoryStore", "step_filename"]


class TrajectoryStore:
    """Lazy reader of a trajectory store directory (create with :func:`open_store`).

    Nothing but ``manifest.json`` and the listing of ``steps/`` is read until a step is asked for.
    ``num_steps`` re-lists ``steps/``, so a store being written (by this process or another) shows every
    completed step. Steps are numbered ``0 .. num_steps - 1``; asking for another raises ``IndexError``.

    A store created by ``StoreWriter.create(None, ...)`` (``attnprobe.record(model)`` without a path)
    owns its temporary directory: the directory is deleted when this object is closed or garbage
    collected. Stores at a user path are never deleted by closing them.

    Example:
        >>> store = attnprobe.open("runs/gen")
        >>> store.num_steps, store.layers[:1]
        (4, ['model.layers.0.self_attn'])
        >>> store.attention_mass(0).shape  # (layers, batch, heads, keys)
        torch.Size([4, 1, 6, 16])
    """

    def __init__(self, path: str | Path, *, _tempdir: tempfile.TemporaryDirectory | None = None) -> None:
        self._path = Path(path)
        self._tempdir = _tempdir
        self._manifest = read_single_manifest(self._path)
        self._manifest_stamp = self._stamp()
        self._count = 0
        self._headers: OrderedDict[int, tuple[tuple[str, ...], dict[str, Any], dict[str, list[str]]]] = (
            OrderedDict()
        )
        self._refresh()

    # -- manifest ------------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        # The manifest is replaced, never edited in place: a new inode marks a new version.
        try:
            st = (self._path / MANIFEST).stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _reload(self) -> None:
        self._manifest = read_single_manifest(self._path)
        self._manifest_stamp = self._stamp()

    def _current_manifest(self) -> dict[str, Any]:
        # Another process may update the fingerprint (layers are known after step 0): re-read on change.
        if self._stamp() != self._manifest_stamp:
            self._reload()
        return self._manifest

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What was recorded: ``model_class``, ``layers``, ``heads``, ``linears`` (a copy)."""
        return json.loads(json.dumps(self._current_manifest()["fingerprint"]))

    @property
    def options(self) -> dict[str, Any]:
        """The recording options (``linear_stats``, ``sink_std``, ...; a copy)."""
        return json.loads(json.dumps(self._current_manifest()["options"]))

    @property
    def schema_version(self) -> int:
        """Version of the on-disk layout."""
        return int(self._manifest["schema_version"])

    @property
    def layers(self) -> list[str]:
        """Attention module names in forward order; ``mass/<i>`` belongs to ``layers[i]``."""
        return list(self._current_manifest()["fingerprint"].get("layers") or [])

    # -- steps ---------------------------------------------------------------------------------------

    def _refresh(self) -> int:
        """List ``steps/`` and return the number of steps, checking they are numbered 0, 1, ..."""
        steps = self._path / STEPS_DIR
        indices = step_indices(steps)
        if indices and indices[-1] != len(indices) - 1:
            missing = next(i for i, index in enumerate(indices) if i != index)
            raise StoreError(
                f"{steps / step_filename(missing)} is missing: the store has {len(indices)} step files up to "
                f"{step_filename(indices[-1])}, and steps must be numbered contiguously from 0. Restore the "
                "file, or move the steps after it out of the store and read the steps before it."
            )
        self._count = len(indices)
        return self._count

    @property
    def num_steps(self) -> int:
        """Number of completed steps (re-read from disk: a store being written grows)."""
        return self._refresh()

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[int]:
        """Step indices ``0 .. num_steps - 1`` (as many as are complete when iteration starts)."""
        return iter(range(self.num_steps))

    def _check_step(self, step: int) -> int:
        """``step`` as an int in ``0 .. num_steps - 1``, else ``IndexError`` with the valid range."""
        if isinstance(step, bool) or not hasattr(step, "__index__"):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)  # also numpy / 0-dim tensor integers
        if 0 <= step < self._count or 0 <= step < self._refresh():
            return step
        self._refresh()
        valid = f"steps 0..{self._count - 1}" if self._count else "no steps yet"
        raise IndexError(f"step {step} is out of range: the store at {self._path} has {valid}.")

    def _open(self, step: int):
        """``safe_open`` of a step file, with errors that name the file."""
        step = self._check_step(step)
        file = self._path / STEPS_DIR / step_filename(step)
        try:
            return safe_open(file, framework="pt", device="cpu")
        except (OSError, SafetensorError) as err:
            if not file.exists():
                raise StoreError(
                    f"{file} is missing (step {step} of {self._count}); restore it or record the store again."
                ) from None
            raise StoreError(
                f"{file} is unreadable ({err}); the step file is corrupt or truncated. Delete it and the "
                "steps after it to keep the steps before it, or record the store again."
            ) from None

    def _header(self, step: int, handle: Any | None = None):
        step = self._check_step(step)
        cached = self._headers.get(step)
        if cached is not None:
            self._headers.move_to_end(step)
            return cached
        if handle is None:
            with self._open(step) as f:
                return self._header(step, f)
        file = self._path / STEPS_DIR / step_filename(step)
        raw = handle.metadata() or {}
        try:
            meta = json.loads(raw.get("meta", "{}"))
            groups = json.loads(raw.get("groups", "{}"))
        except json.JSONDecodeError as err:
            raise StoreError(f"{file} has corrupt metadata ({err}); record the store again.") from None
        header = (tuple(handle.keys()), meta, groups)
        self._headers[step] = header
        if len(self._headers) > _HEADER_CACHE:
            self._headers.popitem(last=False)
        return header

    def _read(self, step: int, select: Any) -> dict[str, Tensor]:
        """Tensors of step ``step`` whose names satisfy ``select(name)``, in one open of its file."""
        with self._open(step) as f:
            names = self._header(step, f)[0]
            return {name: f.get_tensor(name) for name in names if select(name)}

    # -- attention -----------------------------------------------------------------------------------

    def _mass_layers(self, step: int) -> list[int]:
        return sorted(int(n[5:]) for n in self._header(step)[0] if n.startswith("mass/") and n[5:].isdigit())

    def _layer_index(self, layer: int | str) -> int:
        if isinstance(layer, str):
            layers = self.layers
            if layer not in layers:
                raise KeyError(f"{layer!r} is not a layer of the store at {self._path}; its layers: {layers}")
            return layers.index(layer)
        if isinstance(layer, bool) or not hasattr(layer, "__index__"):
            raise TypeError(f"layer must be an index or a layer name, got {type(layer).__name__}")
        return int(layer)

    def layer_mass(self, step: int, layer: int | str) -> Tensor:
        """Attention mass of one layer at one step.

        Args:
            step: step index.
            layer: index into :attr:`layers`, or the layer's module name.

        Returns:
            ``(batch, q_heads, keys)`` float32: attention received by each key, summed over queries.

        Raises:
            IndexError: ``step`` or ``layer`` out of range.
            KeyError: the layer has no mass at this step (it did not run in every forward of the step).

        Example:
            >>> attnprobe.open("runs/gen").layer_mass(0, "model.layers.0.self_attn").shape
            torch.Size([1, 6, 16])
        """
        index = self._layer_index(layer)
        present = self._mass_layers(step)
        if index not in present:
            known = max(len(self.layers), present[-1] + 1 if present else 0)
            if not 0 <= index < known:
                raise IndexError(
                    f"layer {layer} is out of range: the store at {self._path} has layers 0..{known - 1}"
                )
            raise KeyError(
                f"layer {layer} has no attention mass at step {step} of {self._path} (recorded layers: "
                f"{present}); it did not run in every forward of that step."
            )
        return self._read(step, lambda n: n == f"mass/{index}")[f"mass/{index}"]

    def attention_mass(self, step: int) -> Tensor:
        """Attention mass of every layer at one step, stacked.

        Args:
            step: step index.

        Returns:
            ``(layers, batch, q_heads, keys)`` float32, layer ``i`` being ``layers[i]``.

        Raises:
            ValueError: layers differ in heads or keys (e.g. an encoder-decoder); read them one at a
                time with :meth:`layer_mass`.
            KeyError: a layer has no mass at this step.

        Example:
            >>> attnprobe.open("runs/gen").attention_mass(0).sum(dim=(0, 2)).shape  # (batch, keys)
            torch.Size([1, 16])
        """
        present = self._mass_layers(step)
        expected = range(max(len(self.layers), present[-1] + 1 if present else 0))
        missing = [i for i in expected if i not in present]
        if missing:
            raise KeyError(
                f"step {step} of {self._path} has no attention mass for layer(s) {missing}; read the "
                f"recorded layers {present} with layer_mass(step, layer)."
            )
        if not present:
            raise KeyError(f"step {step} of {self._path} holds no attention mass.")
        tensors = self._read(step, lambda n: n.startswith("mass/"))
        masses = [tensors[f"mass/{i}"] for i in expected]
        shapes = {tuple(m.shape) for m in masses}
        if len(shapes) > 1:
            raise ValueError(
                f"the layers of step {step} of {self._path} have different mass shapes {sorted(shapes)} "
                "(batch, heads, keys), so they cannot be stacked; use layer_mass(step, layer) per layer."
            )
        return torch.stack(masses)

    # -- per-step tensors and metadata ---------------------------------------------------------------

    def input_ids(self, step: int) -> Tensor | None:
        """``(batch, seq)`` int64 token ids of the step, or ``None`` when they were not recorded."""
        return self._read(step, lambda n: n == "input_ids").get("input_ids")

    def valid(self, step: int) -> Tensor:
        """``(batch, seq)`` bool, False on padding; all True (shaped like the mass) when not recorded."""
        tensors = self._read(step, lambda n: n == "valid")
        if "valid" in tensors:
            return tensors["valid"]
        names = self._header(step)[0]
        for name in ("input_ids", *(n for n in names if n.startswith("mass/"))):
            if name in names:
                with self._open(step) as f:
                    shape = f.get_slice(name).get_shape()
                return torch.ones(shape[0], shape[-1], dtype=torch.bool)
        file = self._path / STEPS_DIR / step_filename(step)
        raise StoreError(f"{file} has neither 'valid' nor a tensor to infer its shape from; record it again.")

    def step_meta(self, step: int) -> dict[str, Any]:
        """Metadata of the step: ``step``, ``mask_ratio``, ``num_forwards`` and user fields (e.g. ``t``)."""
        return json.loads(json.dumps(self._header(step)[1]))

    def linear_groups(self, step: int) -> dict[str, list[str]]:
        """Input groups of the step: group name -> the linears fed that same input (e.g. q/k/v)."""
        return {g: list(names) for g, names in self._header(step)[2].items()}

    def linear_stats(self, step: int) -> dict[str, dict[str, Tensor]]:
        """Linear-input statistics: group -> ``{"sumsq", "wsumsq", "cand_rows"}``; ``{}`` if not recorded.

        ``sumsq``/``wsumsq`` are ``(batch, in)``, ``cand_rows`` is ``(n, in)`` aligned with
        :meth:`candidates`.
        """
        out: dict[str, dict[str, Tensor]] = {}
        for name, tensor in self._read(step, lambda n: n.startswith("stats/")).items():
            group, field = name[len("stats/") :].rsplit("/", 1)
            out.setdefault(group, {})[field] = tensor
        return out

    def block_cosines(self, step: int) -> dict[str, Tensor]:
        """Block -> ``(batch, tokens)`` cos(block input, block output) per token; ``{}`` if not recorded."""
        found = self._read(step, lambda n: n.startswith("block_cos/"))
        return {name[len("block_cos/") :]: tensor for name, tensor in found.items()}

    def candidates(self, step: int) -> Tensor:
        """``(n, 2)`` int64 rows ``(batch, position)`` of the step's candidate tokens (empty if none)."""
        found = self._read(step, lambda n: n == "cand_index").get("cand_index")
        return found if found is not None else torch.zeros(0, 2, dtype=torch.int64)

    def hessians(self) -> dict[str, dict[str, Tensor]] | None:
        """``XᵀX`` per input group: group -> ``{"plain", "weighted", "nsamples"}``, or ``None`` if absent."""
        file = self._path / HESSIANS
        if not file.exists():
            return None
        out: dict[str, dict[str, Tensor]] = {}
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    group, field = name.rsplit("/", 1)
                    out.setdefault(group, {})[field] = f.get_tensor(name)
        except (OSError, SafetensorError) as err:
            raise StoreError(
                f"{file} is unreadable ({err}); it is corrupt or truncated: delete it and record the "
                "calibration again with hessians=True."
            ) from None
        return out

    # -- tables --------------------------------------------------------------------------------------

    to_pandas = mass_table  # (the long table lives in attnprobe.store.tables)

    # -- lifecycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop cached headers; a store that owns a temporary directory deletes it."""
        self._headers.clear()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        try:
            fingerprint, options, steps = self.fingerprint, self.options, self.num_steps
        except (StoreError, OSError) as err:
            return f"TrajectoryStore({str(self._path)!r}, unreadable: {err})"
        extras = [f"{k}=True" for k in ("linear_stats", "hessians") if options.get(k)]
        temporary = ", temporary" if self._tempdir is not None else ""
        layers = len(fingerprint.get("layers") or [])
        return (
            f"TrajectoryStore({str(self._path)!r}, steps={steps}, layers={layers}, "
            f"model={fingerprint.get('model_class', '?')}{''.join(', ' + e for e in extras)}{temporary})"
        )
