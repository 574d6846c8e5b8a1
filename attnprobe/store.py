"""The on-disk trajectory store: a directory of one manifest and one safetensors file per step.

Layout (schema version 1, details in docs/DESIGN.md)::

    <store>/manifest.json               schema version, fingerprint of the model, record options
    <store>/steps/000000.safetensors    attention mass, ids, statistics of step 0
    <store>/hessians.safetensors        accumulated XᵀX (only with hessians=True), written at close

Every file is written to a temporary name in the same directory, flushed, and renamed into place
(``os.replace`` is atomic), so a process killed mid-recording leaves a store whose completed steps
all open. Reads are lazy: opening a store reads the manifest and lists the step files; a tensor is
read from disk only when asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

SCHEMA_VERSION = 1
FORMAT = "attnprobe-trajectory-store"
MANIFEST = "manifest.json"
STEPS = "steps"
HESSIANS = "hessians.safetensors"
_TMP_SUFFIX = ".tmp"


class StoreError(ValueError):
    """A path that is not a readable trajectory store; the message names the file."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def _step_name(index: int) -> str:
    return f"{index:06d}.safetensors"


class TrajectoryStore:
    """Read a trajectory store lazily.

    Open one with :func:`open_store` (``attnprobe.open``). While a recording is running, the same
    object sees steps as they complete.

    Example:
        >>> store = attnprobe.open("runs/gen")               # doctest: +SKIP
        >>> store.attention_mass(0).shape                     # doctest: +SKIP
        torch.Size([32, 1, 32, 4096])
    """

    def __init__(self, path: str | Path, *, _owner: Any = None) -> None:
        self.path = Path(path)
        self._owner = _owner  # keeps a temporary directory alive as long as this object
        self._manifest = self._read_manifest()
        self._meta_cache = lru_cache(maxsize=256)(self._read_metadata)

    # -- manifest -----------------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any]:
        file = self.path / MANIFEST
        if not file.is_file():
            raise StoreError(
                f"{self.path} is not an attnprobe store (no {MANIFEST}); record one with "
                f"attnprobe.record(model, {str(self.path)!r})"
            )
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{file} is corrupt ({err}); re-record the store or restore the file") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{file} is not an attnprobe manifest (format should be {FORMAT!r})")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{file} has schema version {manifest.get('schema_version')}; this attnprobe reads version "
                f"{SCHEMA_VERSION}. Use the attnprobe version that wrote it."
            )
        return manifest

    def reload(self) -> None:
        """Re-read the manifest (a running recording updates it after its first step)."""
        self._manifest = self._read_manifest()

    @property
    def schema_version(self) -> int:
        return self._manifest["schema_version"]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self._manifest["fingerprint"]

    @property
    def options(self) -> dict[str, Any]:
        return self._manifest["options"]

    @property
    def layers(self) -> list[str]:
        """Attention module names, in the order of their first call."""
        return list(self.fingerprint.get("layers", []))

    # -- steps --------------------------------------------------------------------------------------

    def _step_files(self) -> list[Path]:
        directory = self.path / STEPS
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("."))

    @property
    def num_steps(self) -> int:
        """Completed steps on disk."""
        files = self._step_files()
        for expected, file in enumerate(files):
            if file.name != _step_name(expected):
                raise StoreError(
                    f"{self.path / STEPS / _step_name(expected)} is missing (steps must be numbered from 0 "
                    "without gaps); the store was edited by hand or partly deleted"
                )
        return len(files)

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.num_steps))

    def _file(self, step: int) -> Path:
        count = self.num_steps
        if not -count <= step < count:
            raise IndexError(f"step {step} out of range: the store at {self.path} has steps 0..{count - 1}")
        return self.path / STEPS / _step_name(step % count)

    def _read_metadata(self, file: Path) -> tuple[dict[str, str], frozenset[str]]:
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.metadata() or {}, frozenset(f.keys())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise StoreError(f"{file} is unreadable ({err}); delete it and the steps after it") from None

    def _keys(self, step: int) -> frozenset[str]:
        return self._meta_cache(self._file(step))[1]

    def _tensor(self, step: int, key: str) -> Tensor:
        file = self._file(step)
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)

    def step_meta(self, step: int) -> dict[str, Any]:
        """Step index, mask ratio, number of forwards and user metadata of a step."""
        return json.loads(self._meta_cache(self._file(step))[0].get("meta", "{}"))

    def linear_groups(self, step: int) -> dict[str, list[str]]:
        """Input groups of a step: ``{group: [linear names fed the same input]}``."""
        return json.loads(self._meta_cache(self._file(step))[0].get("groups", "{}"))

    def layer_mass(self, step: int, layer: int | str) -> Tensor:
        """Attention mass of one layer at one step, float32 (batch, heads, keys).

        Raises:
            KeyError: if the layer did not run in that step.
        """
        index = self.layers.index(layer) if isinstance(layer, str) else layer
        key = f"mass/{index}"
        if key not in self._keys(step):
            raise KeyError(f"layer {layer!r} has no mass at step {step} of {self.path}")
        return self._tensor(step, key)

    def attention_mass(self, step: int) -> Tensor:
        """Attention mass of every layer at one step, float32 (layers, batch, heads, keys)."""
        masses = [self.layer_mass(step, i) for i in range(len(self.layers)) if f"mass/{i}" in self._keys(step)]
        shapes = {tuple(m.shape) for m in masses}
        if len(shapes) > 1:
            raise ValueError(
                f"layers of step {step} differ in shape ({sorted(shapes)}); read them one at a time with "
                "store.layer_mass(step, layer)"
            )
        return torch.stack(masses)

    def input_ids(self, step: int) -> Tensor | None:
        """The step's input ids (batch, seq), or None when the model got none."""
        return self._tensor(step, "input_ids") if "input_ids" in self._keys(step) else None

    def valid(self, step: int) -> Tensor:
        """Bool (batch, seq), False on padding."""
        return self._tensor(step, "valid")

    def linear_stats(self, step: int) -> dict[str, dict[str, Tensor]]:
        """``{group: {"sumsq", "wsumsq", "cand_rows"}}`` of a step (empty without linear statistics)."""
        out: dict[str, dict[str, Tensor]] = {}
        file = self._file(step)
        keys = [k for k in self._keys(step) if k.startswith("stats/")]
        if not keys:
            return out
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                group, name = key[len("stats/"):].rsplit("/", 1)
                out.setdefault(group, {})[name] = f.get_tensor(key)
        return out

    def candidates(self, step: int) -> Tensor:
        """(n, 2) rows (sample, position) of the candidate tokens whose input rows were kept."""
        if "cand_index" not in self._keys(step):
            return torch.zeros(0, 2, dtype=torch.int64)
        return self._tensor(step, "cand_index")

    def hessians(self) -> dict[str, dict[str, Tensor]] | None:
        """``{group: {"plain", "weighted", "nsamples"}}`` or None when not recorded."""
        file = self.path / HESSIANS
        if not file.is_file():
            return None
        out: dict[str, dict[str, Tensor]] = {}
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                group, name = key.rsplit("/", 1)
                out.setdefault(group, {})[name] = f.get_tensor(key)
        return out

    def to_pandas(self, steps: list[int] | None = None):
        """Long table of attention mass: columns step, layer, batch, head, key, mass."""
        import pandas as pd

        frames = []
        for step in steps if steps is not None else range(self.num_steps):
            for index, name in enumerate(self.layers):
                try:
                    mass = self.layer_mass(step, index)
                except KeyError:
                    continue
                b, h, k = torch.meshgrid(*(torch.arange(n) for n in mass.shape), indexing="ij")
                frames.append(
                    pd.DataFrame({
                        "step": step, "layer": name, "batch": b.flatten().numpy(), "head": h.flatten().numpy(),
                        "key": k.flatten().numpy(), "mass": mass.flatten().numpy(),
                    })
                )
        columns = ["step", "layer", "batch", "head", "key", "mass"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def __repr__(self) -> str:
        return (
            f"TrajectoryStore({str(self.path)!r}, steps={self.num_steps}, layers={len(self.layers)}, "
            f"model={self.fingerprint.get('model_class')})"
        )


class StoreWriter:
    """Create a store and append steps to it, one atomic file per step."""

    def __init__(self, path: Path, tempdir: tempfile.TemporaryDirectory | None) -> None:
        self.path = path
        self.store = TrajectoryStore(path, _owner=tempdir)
        self._next = self.store.num_steps

    @classmethod
    def create(
        cls,
        path: str | Path | None,
        *,
        fingerprint: dict[str, Any],
        options: dict[str, Any],
        overwrite: bool = False,
        append: bool = False,
    ) -> StoreWriter:
        """Create (or reopen for appending) the store at ``path``; ``None`` → a temporary directory."""
        tempdir = None
        if path is None:
            tempdir = tempfile.TemporaryDirectory(prefix="attnprobe-")
            path = Path(tempdir.name)
        path = Path(path)
        is_store = (path / MANIFEST).is_file()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory; choose another store path")
        if path.is_dir() and any(path.iterdir()):
            if not is_store:
                raise ValueError(
                    f"{path} is a non-empty directory that is not an attnprobe store; attnprobe will not write "
                    "into it. Choose a new or empty directory."
                )
            if append:
                existing = TrajectoryStore(path)
                _check_same_model(path, existing.fingerprint, fingerprint)
                return cls(path, None)
            if not overwrite:
                raise ValueError(
                    f"{path} already holds a store with {TrajectoryStore(path).num_steps} steps; pass "
                    "overwrite=True to replace it or append=True to add steps"
                )
            shutil.rmtree(path)
        (path / STEPS).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "fingerprint": fingerprint,
            "options": options,
        }
        _write_json(path / MANIFEST, manifest)
        return cls(path, tempdir)

    def update_fingerprint(self, **fields: Any) -> None:
        """Rewrite the manifest with updated fingerprint fields (layers are known after step 0)."""
        manifest = json.loads((self.path / MANIFEST).read_text())
        manifest["fingerprint"].update(fields)
        _write_json(self.path / MANIFEST, manifest)
        self.store.reload()

    def write_step(self, tensors: dict[str, Tensor], meta: dict[str, Any], groups: dict[str, list[str]]) -> int:
        """Write the next step file atomically; return its index."""
        index = self._next
        meta = {**meta, "step": index}
        cpu = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
        metadata = {"meta": json.dumps(meta), "groups": json.dumps(groups)}
        _atomic_write(self.path / STEPS / _step_name(index), lambda tmp: save_file(cpu, str(tmp), metadata=metadata))
        self._next += 1
        return index

    def write_hessians(self, tensors: dict[str, Tensor]) -> None:
        """Write the accumulated Hessians atomically (replacing earlier ones)."""
        cpu = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
        _atomic_write(self.path / HESSIANS, lambda tmp: save_file(cpu, str(tmp)))


def _check_same_model(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    differing = [
        key for key in ("model_class", "linears") if old.get(key) != new.get(key)
    ]
    if differing:
        raise ValueError(
            f"cannot append to {path}: it was recorded from another model (different {', '.join(differing)}); "
            "record into a new store"
        )


def open_store(path: str | Path) -> TrajectoryStore:
    """Open a trajectory store for reading (``attnprobe.open``).

    Raises:
        StoreError: for a path without a manifest, a corrupt manifest or an unsupported schema; the
            message names the file.

    Example:
        >>> store = attnprobe.open("runs/gen")               # doctest: +SKIP
    """
    return TrajectoryStore(path)
