"""``attnprobe.record``: stream attention mass and layer-input statistics of every denoising step.

How it hooks in, without editing modeling code:

- a :class:`~attnprobe.recording.capture.SdpaObserver` (a ``TorchFunctionMode``) sees every SDPA call
  while the ``with`` block runs and hands over the post-RoPE ``q``/``k``, the mask, ``is_causal``,
  ``scale`` and ``enable_gqa``; the call itself runs unchanged;
- forward pre/post hooks on the attention modules found by :mod:`attnprobe.layout.registry` keep a stack
  of which module is running, so each SDPA call is attributed to a layer by name;
- pre/post hooks on the model itself delimit steps (one top-level forward = one step, unless the user
  groups forwards with :meth:`Recording.step`) and read ``input_ids`` and the padding
  ``attention_mask``;
- pre-hooks on the ``nn.Linear`` modules of each block keep a reference to the step's inputs. The
  sink weight of a token needs the mass of *every* layer, known only when the step ends, so the inputs
  are held (not copied) until then and reduced once (one pass). ``two_pass=True`` instead replays the
  step's forwards after the mass is known and reduces inside the hooks, for when the buffer does not
  fit.

The attention-side hooks live in :mod:`attnprobe.recording.attention_hooks`, the linear and
routed-expert input hooks in :mod:`attnprobe.recording.input_hooks`, the end-of-step reduction in
:mod:`attnprobe.recording.step_reduce`, the reading view in :mod:`attnprobe.recording.store_view`; this
module holds the lifecycle and the steps.

Every handle, the mode and the registration are owned by the :class:`Recording` and removed in
``__exit__`` in reverse order, whatever ends the block, and the store's writer is closed. The attention
mass and linear statistics of a step reach disk when the step ends; Hessians (``hessians=True``) are
summed in memory and written when the recording closes, also when the block raised: they then cover
exactly the steps on disk (a step's share is added only once its file is written).

Recording follows the thread that entered the block (torch-function modes are per thread): a forward
of the recorded model in another thread is refused with a message saying so.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from attnprobe.layout import experts as moe
from attnprobe.layout.registry import Targets, discover
from attnprobe.recording.attention_hooks import AttentionHooks
from attnprobe.recording.block_cosine import BlockCosineHooks
from attnprobe.recording.capture import SdpaObserver
from attnprobe.recording.input_hooks import InputHooks
from attnprobe.recording.mass import Workspace
from attnprobe.recording.model_calls import token_grid
from attnprobe.recording.options import DEFAULTS, RecordOptions
from attnprobe.recording.step_reduce import Forward, Replay, Step, StepReduction
from attnprobe.recording.store_view import StoreView
from attnprobe.store.fingerprint import store_fingerprint
from attnprobe.store.writer import StoreWriter

logger = logging.getLogger(__name__)

# Which recording a model is under, so that calibrate() and friends can find it. Weak keys: an entry
# never keeps a model alive, and each model has its own entry, so recordings do not interfere.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Recording] = weakref.WeakKeyDictionary()

_EAGER_HELP = (
    "attnprobe sees attention through torch.nn.functional.scaled_dot_product_attention, and this model's "
    "attention modules ran without calling it (eager matmul + softmax, or a fused flash-attn kernel). "
    "Switch the model to SDPA: load it with from_pretrained(..., attn_implementation='sdpa'), or call "
    "model.set_attn_implementation('sdpa') (transformers >= 4.48), or set config._attn_implementation = "
    "'sdpa' before building it; for LLaDA, uninstall flash-attn or set its flash_attention flag off."
)


def active_recording(model: nn.Module) -> Recording | None:
    """The recording currently attached to ``model``, if any."""
    return _ACTIVE.get(model)


class Recording(StoreView, AttentionHooks, InputHooks, BlockCosineHooks, StepReduction):
    """A recording in progress and, after it closes, the store it wrote.

    The reading API of :class:`~attnprobe.TrajectoryStore` (``num_steps``, ``layers``,
    ``attention_mass(step)``, ``hessians()``, ...) works on the recording object too, during and after
    the ``with`` block; after it, the object reads like ``attnprobe.open(store.path)``. Create it with
    :func:`record`.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | Path | None = None,
        *,
        mask_token_id: int | None = None,
        targets: Targets = None,
        linear_stats: bool = DEFAULTS.linear_stats,
        hessians: bool = False,
        two_pass: bool = False,
        sink_std: float = DEFAULTS.sink_std,
        sink_alpha: float = DEFAULTS.sink_alpha,
        candidate_floor_std: float | None = DEFAULTS.candidate_floor_std,
        save_input_ids: bool = DEFAULTS.save_input_ids,
        overwrite: bool = False,
        append: bool = False,
        max_chunk_bytes: int = 32 * 2**20,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"record() needs a torch.nn.Module, got {type(model).__name__}")
        options = RecordOptions(  # checks the settings before anything is attached
            linear_stats=linear_stats,
            hessians=hessians,
            two_pass=two_pass,
            sink_std=sink_std,
            sink_alpha=sink_alpha,
            candidate_floor_std=candidate_floor_std,
            save_input_ids=save_input_ids,
        )
        if active_recording(model) is not None:
            raise RuntimeError(
                f"{type(model).__name__} is already being recorded; close that record() block first."
            )
        self.model = model
        self.layout = discover(model, targets)
        # Routed experts get per-expert statistics from their routing (attnprobe.layout.experts), not linear
        # hooks.
        self._experts = moe.discover_experts(model, sorted(set(self.layout.blocks.values())))
        self._expert_linears = {n for es in self._experts if not es.spec.fused for n in es.weight_names()}
        config = getattr(model, "config", None)
        self.mask_token_id = (
            mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None)
        )
        self._settings = dataclasses.replace(options, mask_token_id=self.mask_token_id)
        self._want_stats = linear_stats or hessians
        self._want_hessians = hessians
        self.two_pass = two_pass
        self.sink_std = sink_std
        self.sink_alpha = sink_alpha
        self.candidate_floor_std = candidate_floor_std
        self.save_input_ids = save_input_ids
        self.max_chunk_bytes = max_chunk_bytes
        self._path = path
        self._overwrite = overwrite
        self._append = append
        self._writer: StoreWriter | None = None
        self._handles: list = []
        self._mode: SdpaObserver | None = None
        self._attention_stack: list[str] = []
        self._step: Step | None = None
        self._forward: Forward | None = None
        self._explicit = False
        self._pending_meta: dict[str, Any] = {}
        self._replay: Replay | None = None
        self._layers: list[str] = []
        self._heads: dict[str, list[int]] = {}
        self._hessians: dict[str, dict[str, Tensor]] = {}
        self._warned: set[str] = set()
        self._workspace = Workspace()  # score chunks of the mass, reused across layers and steps
        self._state = "new"  # new -> open -> closed
        self._thread: int | None = None
        self.peak_buffer_bytes = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return self._settings.manifest(self.layout.attention)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "layers": list(self._layers),
            "heads": dict(self._heads),
            **store_fingerprint(self.model, list(self.layout.linears), self._experts),
        }

    def __enter__(self) -> Recording:
        if self._state != "new":
            raise RuntimeError(
                f"this Recording was already {'entered' if self._state == 'open' else 'used and closed'}; "
                "a record() object records one with-block. Call attnprobe.record(model, path, append=True) "
                "to add steps to its store."
            )
        self._writer = StoreWriter.create(
            self._path,
            fingerprint=self._fingerprint(),
            options=self._options(),
            overwrite=self._overwrite,
            append=self._append,
        )
        own = self._writer.shard  # the whole store, or in a process group this rank's new shard
        if self._append and own.num_steps:
            self._layers = list(own.fingerprint.get("layers", []))
            self._heads = dict(own.fingerprint.get("heads", {}))
            # Hessians are sums over every step: an appended session adds to the earlier ones.
            self._hessians = own.hessians() or {}
        self._thread = threading.get_ident()
        try:
            self._attach()
        except BaseException:
            self._detach()
            self._writer.close()
            self._state = "closed"
            raise
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":
            raise RuntimeError(
                "this Recording is not open (it was never entered, or it already closed); use it as "
                "`with attnprobe.record(model) as store:`."
            )
        try:
            self._detach()
            self._step = self._forward = None
            if self._hessians:
                # Each step's share was added after its file was written: these cover the steps on disk.
                self._writer.write_hessians(
                    {f"{g}/{k}": v for g, stats in self._hessians.items() for k, v in stats.items()}
                )
        finally:
            self._writer.close()
            self._workspace.clear()
            self._state = "closed"

    def _attach(self) -> None:
        modules = dict(self.model.named_modules())
        add = self._handles.append
        add(self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        add(self.model.register_forward_hook(self._on_model_end, with_kwargs=True, always_call=True))
        self._handles.extend(self._attach_attention_hooks(modules))
        if self._want_stats:
            self._handles.extend(self._attach_input_hooks(modules))
            self._handles.extend(self._attach_block_hooks(modules))  # Block Influence (block_cosine)
        self._mode = SdpaObserver(self._on_sdpa)
        self._mode.open()
        _ACTIVE[self.model] = self

    def _detach(self) -> None:
        _ACTIVE.pop(self.model, None)
        if self._mode is not None:
            self._mode.close()  # safe when recordings close out of order (attnprobe.recording.capture)
            self._mode = None
        while self._handles:
            self._handles.pop().remove()
        self._attention_stack.clear()

    # -- steps ---------------------------------------------------------------------------------------

    @contextmanager
    def step(self, **meta: Any) -> Iterator[None]:
        """Group every forward inside the block into one step (CFG, several model calls per step).

        Args:
            **meta: JSON-serialisable metadata stored with the step (e.g. ``t=0.4``).

        Example:
            >>> with attnprobe.record(model) as rec:
            ...     with rec.step(t=0.5):
            ...         cond, uncond = model(ids), model(ids.flip(1))
            >>> rec.num_steps, rec.step_meta(0)["t"]
            (1, 0.5)
        """
        if self._state != "open":
            raise RuntimeError(
                self._not_started("store.step()")
                if self._state == "new"
                else (
                    "store.step() was used after the record() block closed; open a new one with "
                    "attnprobe.record(model, path, append=True)."
                )
            )
        if self._step is not None:
            raise RuntimeError("steps do not nest: a step is already open on this recording")
        self._step = Step(meta={**self._pending_meta, **meta})
        self._pending_meta = {}
        self._explicit = True
        try:
            yield
        except BaseException:
            self._step = None
            raise
        finally:
            self._explicit = False
        step, self._step = self._step, None
        if step is not None and step.forwards:
            self._finish_step(step)

    def annotate(self, **meta: Any) -> None:
        """Attach metadata to the open step, or to the next one when none is open."""
        if self._state != "open":
            raise RuntimeError(
                self._not_started("store.annotate()")
                if self._state == "new"
                else (
                    "store.annotate() was used after the record() block closed; the store is read-only now."
                )
            )
        if self._step is not None:
            self._step.meta.update(meta)
        else:
            self._pending_meta.update(meta)

    def _other_thread(self) -> bool:
        return threading.get_ident() != self._thread

    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._other_thread():
            raise RuntimeError(
                f"a forward of the recorded {type(self.model).__name__} ran in thread "
                f"{threading.current_thread().name!r}, but attnprobe.record() was entered in another "
                "thread; attnprobe sees attention calls only in the thread that entered record() (torch "
                "function modes are per thread). Run the forwards in that thread, or enter record() "
                "inside the worker thread."
            )
        if self._replay is not None:
            return
        if self._forward is not None:
            # The previous forward never reached its end hook (KeyboardInterrupt skips always_call
            # hooks): its step is incomplete, so drop it.
            self._forward = None
            if not self._explicit:
                self._step = None
        if self._step is None:
            self._step = Step(meta=dict(self._pending_meta))
            self._pending_meta = {}
        self._attention_stack.clear()  # a top-level forward starts outside every attention module
        ids, valid, batch, tokens = token_grid(args, kwargs)
        replay = (args, kwargs) if self.two_pass and self._want_stats else None
        self._forward = Forward(batch=batch, tokens=tokens, input_ids=ids, valid=valid, replay=replay)

    def _on_model_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._replay is not None or self._other_thread():
            return
        forward, self._forward = self._forward, None
        if forward is None or self._step is None:
            return
        if output is None and sys.exc_info()[0] is not None:  # the forward raised
            if not self._explicit:
                self._step = None
            return
        if forward.attention_calls and not forward.sdpa_calls:
            if not self._explicit:
                self._step = None
            raise RuntimeError(_EAGER_HELP)
        self._step.forwards.append(forward)
        if not self._explicit:
            step, self._step = self._step, None
            self._finish_step(step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def record(model: nn.Module, path: str | Path | None = None, **options: Any) -> Recording:
    """Record attention mass and layer-input statistics of ``model`` at every step.

    Use as a context manager; the object it yields is the store (it reads the store as it grows and,
    after the block, like ``attnprobe.open(path)``).

    Args:
        model: any ``torch.nn.Module`` whose attention calls ``scaled_dot_product_attention``.
        path: store directory; ``None`` records into a temporary directory that lives as long as the
            returned object.
        mask_token_id: the mask token, for each step's mask ratio (default: ``model.config.mask_token_id``).
        targets: which modules are attention: a regex over module names (full match) or a predicate
            ``(name, module) -> bool``; default: structural discovery (see :mod:`attnprobe.layout.registry`).
        linear_stats: record per-input-feature statistics of every block ``nn.Linear`` (what
            ``prune.apply`` needs; default on). Pass ``False`` for a generation trajectory recorded for
            plots: it then streams attention mass only, faster and with no input buffer
            (docs/BENCHMARKS.md gives both costs).
        hessians: also accumulate ``XᵀX`` per input group, plain and sink-weighted (SparseGPT). Implies
            ``linear_stats``.
        two_pass: replay each step's forwards to reduce linear inputs instead of holding them; use when
            the one-pass buffer (every block linear's input for one step) does not fit.
        sink_std, sink_alpha: the sink rule used for the sink-weighted statistics (docs/METRICS.md).
        candidate_floor_std: tokens with mass above ``mean + floor · std`` keep their squared input rows,
            so that ``prune`` can re-weight for any ``sink_std >= floor``; ``None`` keeps none.
        save_input_ids: store each step's ``input_ids`` (needed to replay the calibration).
        overwrite: replace an existing store at ``path``. append: add steps to it.
        max_chunk_bytes: memory bound for the attention-mass computation of one SDPA call.

    Returns:
        A :class:`Recording`.

    Example:
        >>> with attnprobe.record(model, "runs/gen2", linear_stats=False) as store:
        ...     out = attnprobe.generate(model, prompt, mask_token_id=259, gen_length=8, steps=4)
        >>> store.num_steps
        4
    """
    return Recording(model, path, **options)
