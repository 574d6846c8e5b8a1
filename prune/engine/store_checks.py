"""What ``prune`` accepts as a calibration store, and what it refuses before touching any weight.

A store is the object bound by ``with attnprobe.record(model) as store`` (after the block), a
:class:`attnprobe.TrajectoryStore`, or a path to one. It must come from this model (class, linear
shapes) and this checkpoint (the weight sample of ``attnprobe``'s fingerprint, unless
``allow_other_weights``), and one-shot SparseGPT needs Hessians that cover exactly the store's steps.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

import attnprobe
from attnprobe import Recording, TrajectoryStore, fingerprint_problems
from prune.engine.statistics import SinkSettings
from prune.export.mask_files import shown


def as_store(store: Any, *, needed: str = "a calibration store"):
    """The trajectory store behind ``store``: a store, a closed ``record()`` object, or a path to one.

    Raises:
        TypeError: ``store`` is none of these (the message names what was given and what to pass).
        RuntimeError: a ``record()`` object whose block has not closed yet.
        StoreError: a path that holds no readable store.
    """
    if isinstance(store, TrajectoryStore):
        return store
    if isinstance(store, Recording):
        if not store.closed:
            raise RuntimeError(
                "prune.apply got a recording whose `with attnprobe.record(...)` block is still open (or was "
                "never entered); call prune.apply after the block closes, when every step and the Hessians "
                "are on disk."
            )
        return store.store
    if isinstance(store, (str, os.PathLike)):
        return attnprobe.open(store)
    raise TypeError(
        f"prune.apply needs {needed}, got {type(store).__name__} {str(store)[:60]!r}. Pass the object "
        "bound by `with attnprobe.record(model) as store:`, attnprobe.open(path), or the store's path."
    )


def check_fingerprint(model: nn.Module, store, *, allow_other_weights: bool = False) -> None:
    """Refuse a store recorded from another model (class, linear shapes) or checkpoint (weight sample)."""
    problems, differ = fingerprint_problems(store.fingerprint, model, check_weights=not allow_other_weights)
    if problems:
        raise ValueError(
            f"the store at {store.path} was recorded from another model ({shown(problems)}). "
            "Record a calibration store from this model with attnprobe.record(model, path)."
        )
    if differ:
        raise ValueError(
            f"the store at {store.path} was recorded from another checkpoint of {type(model).__name__}: "
            f"the weights of {len(differ)} linear(s) differ from those sampled at record time "
            f"({shown(differ)}). Its statistics describe that checkpoint's activations (the "
            "model may also have been pruned or fine-tuned since). Record a calibration store from this "
            "model, or pass allow_other_weights=True to apply it to a fine-tuned sibling on purpose."
        )


def hessians_from_store(store, sink_aware: bool, settings: SinkSettings) -> dict[str, Tensor]:
    """SparseGPT's ``H = 2/n · Σ XᵀX`` per linear from the store's Hessians (plain or sink-weighted)."""
    stored = store.hessians()
    if stored is None:
        raise ValueError(
            f"one-shot SparseGPT needs Hessians, and the store at {store.path} has none: record it with "
            "attnprobe.record(model, path, hessians=True), or pass sequential=True to replay its inputs."
        )
    options = store.options
    if sink_aware and (
        settings.policy != "all"
        or (settings.sink_std, settings.sink_alpha) != (options.get("sink_std"), options.get("sink_alpha"))
    ):
        raise ValueError(
            f"the store's Hessians were sink-weighted with sink_std={options.get('sink_std')}, "
            f"sink_alpha={options.get('sink_alpha')}, policy 'all'; other settings need sequential=True "
            "(which replays the recorded inputs) or a new recording."
        )
    _check_hessian_coverage(store, stored)
    key = "weighted" if sink_aware else "plain"
    out = {}
    for group, tensors in stored.items():
        # SparseGPT's H = (2 / n) Σ x xᵀ over the n calibration sequences (arXiv 2301.00774).
        hessian = tensors[key] * (2.0 / max(int(tensors["nsamples"]), 1))
        for name in store.linear_groups(0).get(group, [group]):
            out[name] = hessian
    return out


def _check_hessian_coverage(store, stored: dict[str, dict[str, Tensor]]) -> None:
    """Refuse Hessians that do not sum exactly the samples of the steps on disk."""
    expected: dict[str, int] = {}
    for step in range(store.num_steps):
        batch = store.valid(step).shape[0]
        for group in store.linear_groups(step):
            expected[group] = expected.get(group, 0) + batch
    wrong = [
        f"{group}: {int(t['nsamples'])} samples summed, {expected.get(group, 0)} in the steps"
        for group, t in stored.items()
        if "nsamples" in t and int(t["nsamples"]) != expected.get(group, 0)
    ]
    if wrong:
        raise ValueError(
            f"the Hessians in {store.path} do not cover the store's steps ({shown(wrong)}): the recording "
            "was interrupted while writing them, or steps were added or removed since. Record the "
            "calibration again (or use sequential=True, which measures Hessians by replaying the steps)."
        )


def grams_from_store(store, sink_aware: bool, settings, *, required: bool, why: str) -> dict[str, Tensor]:
    """The store's Hessians as Gram matrices (plain or sink-weighted), or {} when optional and absent.

    Raises:
        ValueError: when ``required`` and the store has none (or none for these sink settings).
    """
    if store is None or not store.options.get("hessians"):
        if required:
            raise ValueError(
                f"{why} needs the Gram matrix XᵀX of every pruned linear's inputs; one-shot it comes "
                "from the store's Hessians, and this store has none. Record with "
                "attnprobe.record(model, path, hessians=True), or pass sequential=True (the engine "
                "measures them block by block)."
            )
        return {}
    try:
        return hessians_from_store(store, sink_aware, settings)
    except ValueError:
        if required:
            raise
        return {}
