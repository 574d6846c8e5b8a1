"""The end of a recorded step: stack its forwards' mass, reduce the held linear inputs with the step's
sink weights, write the step file, then add the step's share to the Hessians.

:class:`StepReduction` is the part of :class:`attnprobe.recording.record.Recording` that runs when a step
ends;
it reads the recording's state (``_layers``, ``_heads``, ``_writer``, ``_hessians``, the sink and
statistics options, ``model`` for two-pass replays). The dataclasses are what the recorder's hooks
collect during a step.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnprobe.analysis import sinks
from attnprobe.recording.expert_stats import reduce_experts
from attnprobe.recording.linear_stats import reduce_inputs

logger = logging.getLogger("attnprobe.record")


@dataclass
class Forward:
    """One top-level forward within a step."""

    batch: int | None
    tokens: int | None
    input_ids: Tensor | None
    valid: Tensor | None  # (batch, tokens) bool, False on padding
    replay: tuple[tuple, dict] | None  # args, kwargs, kept only in two-pass mode
    mass: dict[str, Tensor] = field(default_factory=dict)  # layer -> (batch, heads, keys)
    inputs: dict[str, Tensor] = field(default_factory=dict)  # group -> held input (one-pass)
    seen: dict[int, tuple[str, weakref.ref]] = field(default_factory=dict)  # id(input) -> group
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> linear names
    routed: dict[str, tuple] = field(default_factory=dict)  # experts -> (ExpertSet, hidden, index)
    block_cos: dict[str, Tensor] = field(default_factory=dict)  # block -> (batch, tokens) cos(in, out)
    attention_calls: int = 0
    sdpa_calls: int = 0


@dataclass
class Step:
    meta: dict[str, Any]
    forwards: list[Forward] = field(default_factory=list)


@dataclass
class Replay:
    """What the linear hooks need while a step is replayed (two-pass mode)."""

    forward: Forward
    weights: Tensor
    candidates: Tensor
    results: dict[str, dict[str, Tensor]] = field(default_factory=dict)


class StepReduction:
    """End-of-step reduction and writing, mixed into :class:`attnprobe.recording.record.Recording`."""

    def _finish_step(self, step: Step) -> None:
        forwards = [f for f in step.forwards if f.mass]
        if not forwards:
            return
        for f in forwards:
            for layer in f.mass:
                if layer not in self._layers:
                    self._layers.append(layer)
        lengths = {self._valid_of(f).shape[1] for f in forwards}
        if len(lengths) > 1:
            raise RuntimeError(
                f"the forwards grouped into one step have different sequence lengths {sorted(lengths)}; "
                "a step's forwards are stacked along the batch, so give them one length (pad) or record "
                "them as separate steps"
            )
        layers = [layer for layer in self._layers if all(layer in f.mass for f in forwards)]
        tensors: dict[str, Tensor] = {}
        for layer in layers:
            tensors[f"mass/{self._layers.index(layer)}"] = torch.cat([f.mass[layer] for f in forwards])
        valid = torch.cat([self._valid_of(f) for f in forwards])
        tensors["valid"] = valid
        ids = [f.input_ids for f in forwards]
        if self.save_input_ids and all(i is not None for i in ids):
            tensors["input_ids"] = torch.cat(ids)
        meta = {**step.meta, "num_forwards": len(forwards), "mask_ratio": self._mask_ratio(tensors, valid)}
        for block in forwards[0].block_cos:  # attnprobe.recording.block_cosine: blocks every forward ran
            if all(block in f.block_cos for f in forwards):
                tensors[f"block_cos/{block}"] = torch.cat([f.block_cos[block] for f in forwards])
        groups: dict[str, list[str]] = {}
        hessians: dict[str, dict[str, Tensor]] = {}
        if self._want_stats:
            groups, hessians = self._step_statistics(forwards, layers, valid, tensors)
        index = self._writer.write_step(tensors, meta, groups)
        self._add_hessians(hessians)  # only now: the Hessians never count a step that is not on disk
        if (
            self._writer.shard.fingerprint.get("layers") != self._layers
            or self._writer.shard.fingerprint.get("heads") != self._heads
        ):
            self._writer.update_fingerprint(layers=list(self._layers), heads=dict(self._heads))
        logger.debug("attnprobe: wrote step %d (%d layers)", index, len(layers))

    def _valid_of(self, forward: Forward) -> Tensor:
        if forward.valid is not None:
            return forward.valid
        some_mass = next(iter(forward.mass.values()))  # (batch, heads, keys)
        return torch.ones(some_mass.shape[0], some_mass.shape[-1], dtype=torch.bool, device=some_mass.device)

    def _mask_ratio(self, tensors: dict[str, Tensor], valid: Tensor) -> float | None:
        ids = tensors.get("input_ids")
        if ids is None or self.mask_token_id is None or ids.shape != valid.shape:
            return None
        masked = ((ids == self.mask_token_id) & valid).sum()
        return float(masked / valid.sum().clamp(min=1))

    def _add_hessians(self, step_hessians: dict[str, dict[str, Tensor]]) -> None:
        for group, parts in step_hessians.items():
            acc = self._hessians.setdefault(group, {})
            for key, value in parts.items():
                # an appended session starts from the stored (CPU) Hessians: add on this group's device
                acc[key] = acc[key].to(value.device) + value if key in acc else value

    def _step_statistics(
        self, forwards: list[Forward], layers: list[str], valid: Tensor, tensors: dict[str, Tensor]
    ) -> tuple[dict[str, list[str]], dict[str, dict[str, Tensor]]]:
        # Sink weights use the mass of every layer whose keys are the step's tokens.
        tokens = valid.shape[1]
        per_layer = [tensors[f"mass/{self._layers.index(layer)}"] for layer in layers]
        total = sinks.step_mass(per_layer, tokens)  # (batch, tokens)
        if total is None:  # no layer attends over the step's own tokens
            total = torch.zeros(valid.shape, device=valid.device)
        weights = sinks.sink_weights(total, valid, sink_std=self.sink_std, sink_alpha=self.sink_alpha)
        if self.candidate_floor_std is not None:
            candidates = sinks.candidate_mask(total, valid, floor_std=self.candidate_floor_std)
        else:
            candidates = torch.zeros_like(valid)
        cand_index = candidates.nonzero()  # (n, 2) rows (sample, token), sorted by sample
        tensors["cand_index"] = cand_index
        per_group: dict[str, list[dict[str, Tensor]]] = {}
        groups: dict[str, list[str]] = {}
        offset = cand_offset = 0
        for forward in forwards:
            rows = slice(offset, offset + (forward.batch or valid.shape[0]))
            offset = rows.stop
            mine = cand_index[(cand_index[:, 0] >= rows.start) & (cand_index[:, 0] < rows.stop)]
            mine = mine - torch.tensor([rows.start, 0], device=mine.device)
            for group, stats in self._forward_statistics(forward, weights[rows], mine).items():
                if "cand_sel" in stats:  # per-expert rows index the forward's candidates: make it the step's
                    stats = {**stats, "cand_sel": stats["cand_sel"] + cand_offset}
                per_group.setdefault(group, []).append(stats)
            cand_offset += mine.shape[0]
            for group, members in forward.groups.items():
                groups.setdefault(group, members)
        hessians: dict[str, dict[str, Tensor]] = {}
        for group, parts in per_group.items():
            # Expert groups add ``tokens`` and ``cand_sel`` to the three keys of a linear group.
            for key in [k for k in parts[0] if k not in ("plain", "weighted")]:
                tensors[f"stats/{group}/{key}"] = torch.cat([p[key] for p in parts])
            if self._want_hessians:
                hessians[group] = {key: sum(p[key] for p in parts) for key in ("plain", "weighted")}
                seen = sum(p["sumsq"].shape[0] for p in parts)
                hessians[group]["nsamples"] = torch.tensor(seen, dtype=torch.int64)
        return groups, hessians

    def _forward_statistics(
        self, forward: Forward, weights: Tensor, candidates: Tensor
    ) -> dict[str, dict[str, Tensor]]:
        if self.two_pass:
            self._replay = Replay(forward=forward, weights=weights, candidates=candidates)
            forward.groups.clear()
            forward.seen.clear()
            try:
                args, kwargs = forward.replay
                with torch.no_grad():
                    self.model(*args, **kwargs)
                return self._replay.results
            finally:
                self._replay = None
        out = {}
        for group, x in forward.inputs.items():
            valid = forward.valid if forward.valid is not None else x.new_ones(x.shape[:2], dtype=torch.bool)
            out[group] = reduce_inputs(x, valid, weights, candidates, hessians=self._want_hessians)
        forward.inputs.clear()  # release the held activations
        forward.seen.clear()
        out.update(self._reduce_routed(forward, weights, candidates))
        return out

    def _reduce_routed(self, forward: Forward, weights: Tensor, candidates: Tensor) -> dict[str, dict]:
        """Per-expert statistics of the MoE layers this forward ran, releasing their held inputs."""
        modules = dict(self.model.named_modules())
        out: dict[str, dict] = {}
        for es, hidden, index in forward.routed.values():
            grid = (forward.batch, forward.tokens)
            valid = forward.valid if forward.valid is not None else hidden.new_ones(grid, dtype=torch.bool)
            out.update(
                reduce_experts(
                    modules, es, hidden, index, valid, weights, candidates, hessians=self._want_hessians
                )
            )
        forward.routed.clear()
        return out
