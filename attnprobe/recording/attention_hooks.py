"""Attention hooks of a recording: which layer an SDPA call belongs to, and its attention mass.

:class:`AttentionHooks` is the part of :class:`attnprobe.recording.record.Recording` that turns SDPA calls
into
per-layer mass. Forward pre/post hooks on the attention modules found by :mod:`attnprobe.layout.registry`
keep a stack of which module is running, so each call the :class:`~attnprobe.recording.capture.SdpaObserver`
hands over is attributed to a layer by name; the mass is computed right away (:mod:`attnprobe.recording.mass`)
and added to the running forward. It reads the recording's state (``layout``, ``_forward``,
``_replay``, ``_heads``, ``_workspace``, ``max_chunk_bytes``, ``_warn_once``).
"""

from __future__ import annotations

from torch import nn

from attnprobe.recording.capture import SdpaCall
from attnprobe.recording.mass import sdpa_call_mass


class AttentionHooks:
    """Attention-module and SDPA hooks, mixed into :class:`attnprobe.recording.record.Recording`."""

    def _attach_attention_hooks(self, modules: dict[str, nn.Module]) -> list:
        """Pre/post hooks on every attention module, keeping the stack of running attention modules."""
        handles = []
        for name in self.layout.attention:
            module = modules[name]
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._enter_attention(n)))
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, n=name: self._leave_attention(n), always_call=True
                )
            )
        return handles

    def _enter_attention(self, name: str) -> None:
        if not self._other_thread():
            self._attention_stack.append(name)

    def _leave_attention(self, name: str) -> None:
        if self._other_thread():
            return
        if self._attention_stack and self._attention_stack[-1] == name:
            self._attention_stack.pop()
        if self._forward is not None:
            self._forward.attention_calls += 1

    def _on_sdpa(self, call: SdpaCall) -> None:
        forward = self._forward
        if self._replay is not None or forward is None:
            return
        if not self._attention_stack:
            self._warn_once(
                "unattributed",
                "scaled_dot_product_attention was called outside the attention modules attnprobe found "
                f"({len(self.layout.attention)} modules, e.g. {self.layout.attention[0]!r}); that call is "
                "not recorded. Pass targets= to record() to choose the attention modules.",
            )
            return
        forward.sdpa_calls += 1
        layer = self._attention_stack[-1]
        _, q_heads, _, head_dim = call.query.shape
        # one definition of the padding rule (padded queries add nothing, padded keys get nothing),
        # shared with the block-wise mass pass; valid follows each layer's device inside it
        mass = sdpa_call_mass(
            call, forward.valid, max_chunk_bytes=self.max_chunk_bytes, workspace=self._workspace
        )
        if layer in forward.mass:  # a layer called twice in one forward adds up
            forward.mass[layer] = forward.mass[layer] + mass
        else:
            forward.mass[layer] = mass
        if layer not in self._heads:
            self._heads[layer] = [q_heads, call.key.shape[1], head_dim]
