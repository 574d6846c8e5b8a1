"""Input hooks of a recording: where block linears and routed experts hand over their inputs.

:class:`InputHooks` is the part of :class:`attnprobe.recording.record.Recording` that collects what the linear
statistics are reduced from. Pre-hooks on the dense ``nn.Linear`` modules of each block keep a reference
to the step's inputs (one-pass) or reduce them during the replay (two-pass); routed experts get their
hidden states and routing index from :mod:`attnprobe.layout.experts` instead, since their linears see only the
tokens routed to them. It reads the recording's state (``_forward``, ``_step``, ``_replay``,
``two_pass``, ``_want_hessians``, ``_warn_once``); the end-of-step reduction is
:mod:`attnprobe.recording.step_reduce`.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from attnprobe.layout import experts as moe
from attnprobe.recording.linear_stats import reduce_inputs


class InputHooks:
    """Linear and routed-expert input hooks, mixed into :class:`attnprobe.recording.record.Recording`."""

    def _attach_input_hooks(self, modules: dict[str, nn.Module]) -> list:
        """Hook every block linear (except fused or routed experts') and every expert set's routing."""
        handles = []
        for name in self.layout.linears:
            if name not in self._expert_linears:
                handles.append(
                    modules[name].register_forward_pre_hook(lambda m, a, n=name: self._on_linear(n, a))
                )
        handles += moe.attach(self.model, self._experts, self._on_routing, self._routing_unread)
        return handles

    def _on_linear(self, name: str, args: tuple) -> None:
        if self._other_thread() or self.two_pass and self._replay is None:
            return  # two-pass: inputs are reduced when the step is replayed
        forward = self._replay.forward if self._replay is not None else self._forward
        if forward is None or not args or not isinstance(args[0], Tensor):
            return
        x = args[0].detach()
        grid = (forward.batch, forward.tokens)
        if x.dim() == 2 and None not in grid and x.shape[0] == forward.batch * forward.tokens:
            x = x.view(forward.batch, forward.tokens, -1)
        if None in grid or tuple(x.shape[:-1]) != grid:
            self._warn_once(
                f"grid:{name}",
                f"{name} got input of shape {tuple(x.shape)}, not (batch, tokens, features) = {grid}; its "
                "input statistics are not recorded (token routing, e.g. mixture-of-experts).",
            )
            return
        # Linears fed the very same tensor (q/k/v, gate/up) form one input group, reduced once. The weak
        # reference guards against a freed tensor's id being reused by a later input.
        seen = forward.seen.get(id(args[0]))
        if seen is not None and seen[1]() is args[0]:
            forward.groups[seen[0]].append(name)
            return
        if name in forward.groups:
            self._warn_once(
                f"twice:{name}", f"{name} ran twice in one forward; only its first input is used."
            )
            return
        forward.seen[id(args[0])] = (name, weakref.ref(args[0]))
        forward.groups[name] = [name]
        if self._replay is not None:
            replay = self._replay
            valid = forward.valid if forward.valid is not None else x.new_ones(grid, dtype=torch.bool)
            replay.results[name] = reduce_inputs(
                x, valid, replay.weights, replay.candidates, hessians=self._want_hessians
            )
            return
        forward.inputs[name] = x
        earlier = self._step.forwards if self._step is not None else []
        held = sum(t.numel() * t.element_size() for f in [*earlier, forward] for t in f.inputs.values())
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)

    def _on_routing(self, es: moe.ExpertSet, hidden: Tensor, index: Tensor) -> None:
        if self._other_thread() or self.two_pass and self._replay is None:
            return
        forward = self._replay.forward if self._replay is not None else self._forward
        if forward is None:
            return
        if None in (forward.batch, forward.tokens) or hidden.shape[0] != forward.batch * forward.tokens:
            self._warn_once(
                f"routing:{es.name}",
                f"{es.name} got {hidden.shape[0]} rows, not batch · tokens = {forward.batch} · "
                f"{forward.tokens}; its per-expert statistics are not recorded.",
            )
            return
        if es.name in forward.routed:
            message = f"{es.name} ran twice in one forward; only its first call counts."
            self._warn_once(f"twice:{es.name}", message)
            return
        forward.routed[es.name] = (es, hidden, index)
        for expert in range(es.num_experts):
            forward.groups.update(es.groups(expert))
        if self._replay is not None:
            replay = self._replay
            replay.results.update(self._reduce_routed(forward, replay.weights, replay.candidates))
            return
        # One-pass: the hidden states are held until the step ends, like the linear inputs.
        forwards = [*(self._step.forwards if self._step is not None else []), forward]
        held = [t for f in forwards for t in f.inputs.values()]
        held += [h for f in forwards for _, h, _ in f.routed.values()]
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, sum(t.numel() * t.element_size() for t in held))

    def _routing_unread(self, es: moe.ExpertSet) -> None:
        self._warn_once(
            f"routing:{es.name}",
            f"could not read the hidden states and routing index of {es.name} ({es.adapter} experts, hooked "
            f"at {es.capture}); its per-expert statistics are not recorded.",
        )
