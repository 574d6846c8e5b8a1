"""A calibration store written block by block: attention mass of one block call at a time.

:func:`attnprobe.record` needs whole-model forwards. A model that does not fit the device is instead
run one block at a time over every calibration step (``prune.record_blockwise`` drives that: it
captures the first block's inputs and feeds each block the previous block's outputs). This module is
attnprobe's side of it: :class:`BlockMassRecording` sees the SDPA calls made inside one block call
(:class:`~attnprobe.recording.capture.SdpaObserver`, attributed to attention modules by pre/post hooks as in
the recorder), computes their mass with :func:`attnprobe.recording.mass.sdpa_call_mass` (padded queries add
nothing, padded keys get nothing, GQA and ``is_causal`` as SDPA) and, once every block has run,
writes an ordinary store: one file per step with every layer's mass, ``valid``, ``input_ids`` and the
step's metadata, read by :func:`attnprobe.open` like a recorded one (``linear_stats=False``).

Memory: the pass is block-major and the store step-major. The mass of the block being run is held on
the CPU for every step, float32 ``(steps, batch, heads, keys)`` per layer (LLaDA-8B, 1,280 windows
of 4,096 tokens: 640 MiB per layer), and written to a spool file per layer when the block is done
(:meth:`BlockMassRecording.flush`); the step files are then assembled reading one step of each spool
file at a time. The spool lives in a temporary directory next to the store (``spool_dir``) and is
deleted when the recording closes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from attnprobe.layout import experts as moe
from attnprobe.layout.registry import Targets, discover
from attnprobe.recording.capture import SdpaCall, SdpaObserver
from attnprobe.recording.mass import Workspace, sdpa_call_mass
from attnprobe.recording.options import DEFAULTS, RecordOptions
from attnprobe.store.fingerprint import store_fingerprint
from attnprobe.store.reader import TrajectoryStore
from attnprobe.store.writer import StoreWriter


class BlockMassRecording:
    """Records attention mass block call by block call, then writes it as a step-major store.

    Use as a context manager: :meth:`observe` around each block call of each step, :meth:`flush`
    after each block, :meth:`write_steps` once every block has run. The store (options like
    ``record(..., linear_stats=False)``) is :attr:`store`.

    Args:
        model: the model whose blocks are run (its attention modules are found by
            :func:`attnprobe.discover`, ``targets`` as in :func:`attnprobe.record`).
        path: store directory; None records into a temporary directory owned by :attr:`store`.
        mask_token_id, sink_std, sink_alpha, candidate_floor_std, overwrite, max_chunk_bytes: as in
            :func:`attnprobe.record`.
        spool_dir: where the per-layer spool files go (default: a temporary directory next to the
            store, on the same disk).

    Example (a sketch of the engine's loop, not run: ``blocks``, ``cached`` and ``steps`` come from
    ``prune.record_blockwise``, which runs this for real and is tested)::

        >>> with BlockMassRecording(model, "runs/calib", mask_token_id=126336) as rec:  # doctest: +SKIP
        ...     for block in blocks:
        ...         for step, inputs in enumerate(cached):
        ...             with rec.observe(step, valid[step]):
        ...                 outputs[step] = block(inputs)
        ...         rec.flush()
        ...     rec.write_steps(steps)
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | Path | None = None,
        *,
        mask_token_id: int | None = None,
        targets: Targets = None,
        sink_std: float = DEFAULTS.sink_std,
        sink_alpha: float = DEFAULTS.sink_alpha,
        candidate_floor_std: float | None = DEFAULTS.candidate_floor_std,
        overwrite: bool = False,
        max_chunk_bytes: int = 32 * 2**20,
        spool_dir: str | Path | None = None,
    ) -> None:
        self.model = model
        self.layout = discover(model, targets)
        config = getattr(model, "config", None)
        self.mask_token_id = (
            mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None)
        )
        self.max_chunk_bytes = max_chunk_bytes
        # what record(..., linear_stats=False) writes, so readers and prune see the same store
        self._options = RecordOptions(
            linear_stats=False,
            sink_std=sink_std,
            sink_alpha=sink_alpha,
            candidate_floor_std=candidate_floor_std,
            mask_token_id=self.mask_token_id,
        ).manifest(self.layout.attention, recorded="block-wise")
        self._path = path
        self._overwrite = overwrite
        self._spool_parent = spool_dir
        self._spool: tempfile.TemporaryDirectory | None = None
        self._writer: StoreWriter | None = None
        self._handles: list = []
        self._stack: list[str] = []
        self._layers: list[str] = []
        self._heads: dict[str, list[int]] = {}
        self._pending: dict[str, dict[int, Tensor]] = {}  # layer -> step -> mass (CPU), this block
        self._spooled: dict[str, Path] = {}
        self._current: dict[str, Tensor] | None = None
        self._valid: Tensor | None = None
        self._workspace = Workspace()

    @property
    def store(self) -> TrajectoryStore:
        """The store being written (complete once :meth:`write_steps` returned)."""
        if self._writer is None:
            raise RuntimeError("use BlockMassRecording as a context manager: `with BlockMassRecording(...):`")
        return self._writer.store

    def __enter__(self) -> BlockMassRecording:
        experts = moe.discover_experts(self.model, sorted(set(self.layout.blocks.values())))
        fingerprint = {
            "layers": [],
            "heads": {},
            **store_fingerprint(self.model, list(self.layout.linears), experts),
        }
        self._writer = StoreWriter.create(
            self._path, fingerprint=fingerprint, options=self._options, overwrite=self._overwrite
        )
        parent = self._spool_parent
        if parent is None and self._path is not None:
            parent = Path(self._path).resolve().parent
        self._spool = tempfile.TemporaryDirectory(
            prefix=".attnprobe-spool-", dir=parent, ignore_cleanup_errors=True
        )
        modules = dict(self.model.named_modules())
        for name in self.layout.attention:
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._stack.append(n)))
            self._handles.append(
                module.register_forward_hook(lambda m, a, o, n=name: self._leave(n), always_call=True)
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._pending.clear()
        self._workspace.clear()
        if self._writer is not None:
            self._writer.close()
        if self._spool is not None:
            self._spool.cleanup()
            self._spool = None

    def _leave(self, name: str) -> None:
        if self._stack and self._stack[-1] == name:
            self._stack.pop()

    @contextmanager
    def observe(self, step: int, valid: Tensor | None) -> Iterator[None]:
        """Record the mass of the SDPA calls made inside the block while the ``with`` block runs.

        Args:
            step: the calibration step this call belongs to (its index in :meth:`write_steps`).
            valid: bool ``(batch, tokens)``, False on padding; None when the step has no padding mask.
        """
        if self._writer is None:
            raise RuntimeError("observe() runs inside `with BlockMassRecording(...):`")
        self._current, self._valid = {}, valid
        self._stack.clear()
        mode = SdpaObserver(self._on_sdpa)
        mode.open()
        try:
            yield
        finally:
            mode.close()
            current, self._current, self._valid = self._current, None, None
        if not current:
            raise RuntimeError(
                "a block ran without a scaled_dot_product_attention call inside the attention modules "
                f"attnprobe found (e.g. {self.layout.attention[0]!r}): attnprobe needs SDPA attention. Load "
                "the model with attn_implementation='sdpa' (or set config._attn_implementation = 'sdpa'), "
                "or pass targets= to choose the attention modules."
            )
        for layer, mass in current.items():
            if layer not in self._layers:
                self._layers.append(layer)
            self._pending.setdefault(layer, {})[step] = mass.to("cpu")

    def _on_sdpa(self, call: SdpaCall) -> None:
        if self._current is None or not self._stack:
            return  # outside the attention modules found by discover(): not recorded, as in record()
        layer = self._stack[-1]
        mass = sdpa_call_mass(
            call, self._valid, max_chunk_bytes=self.max_chunk_bytes, workspace=self._workspace
        )
        previous = self._current.get(layer)
        self._current[layer] = mass if previous is None else previous + mass  # a layer called twice adds
        if layer not in self._heads:
            batch, q_heads, _, head_dim = call.query.shape
            self._heads[layer] = [q_heads, call.key.shape[1], head_dim]

    def flush(self) -> None:
        """Write the held mass (the block just run, every step) to one spool file per layer."""
        for layer, by_step in self._pending.items():
            target = Path(self._spool.name) / f"layer{self._layers.index(layer)}.safetensors"
            save_file({str(step): mass.contiguous() for step, mass in by_step.items()}, str(target))
            self._spooled[layer] = target
        self._pending.clear()

    def write_steps(
        self, steps: list[tuple[Tensor, Tensor, dict[str, Any]]], extra: list[dict[str, Tensor]] | None = None
    ) -> TrajectoryStore:
        """Write one store step per ``(input_ids, valid, meta)``, in order, with every layer's mass
        (and ``extra[i]``'s tensors in step i, e.g. the block cosines of
        :mod:`attnprobe.recording.block_cosine`).

        Raises:
            RuntimeError: if no SDPA call was seen (eager attention), or a layer lacks a step.
        """
        self.flush()
        if not self._layers:
            raise RuntimeError(
                "no scaled_dot_product_attention call was seen inside the blocks: attnprobe needs SDPA "
                "attention. Load the model with attn_implementation='sdpa' (or set "
                "config._attn_implementation = 'sdpa')."
            )
        files = {layer: safe_open(str(self._spooled[layer]), "pt") for layer in self._layers}
        for index, (input_ids, valid, meta) in enumerate(steps):
            tensors: dict[str, Tensor] = {}
            for number, layer in enumerate(self._layers):
                if str(index) not in files[layer].keys():
                    raise RuntimeError(f"layer {layer} has no attention mass for step {index}")
                tensors[f"mass/{number}"] = files[layer].get_tensor(str(index))
            valid = valid.to("cpu", torch.bool)
            ids = input_ids.to("cpu")
            tensors["valid"] = valid
            tensors["input_ids"] = ids
            tensors.update(extra[index] if extra is not None else {})
            ratio = None
            if self.mask_token_id is not None and ids.shape == valid.shape:
                ratio = float(((ids == self.mask_token_id) & valid).sum() / valid.sum().clamp(min=1))
            self._writer.write_step(tensors, {**meta, "num_forwards": 1, "mask_ratio": ratio}, {})
        self._writer.update_fingerprint(layers=list(self._layers), heads=dict(self._heads))
        return self._writer.store
