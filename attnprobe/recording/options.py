"""What a recording measures, in one place: its defaults and the ``options`` it writes to a store.

``record()`` and the block-by-block mass pass (:class:`attnprobe.BlockMassRecording`) take these
settings and write the same manifest ``options``, so a reader (and ``prune``) sees one kind of store
whichever way it was recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnprobe.analysis.sinks import DEFAULT_SINK_ALPHA, DEFAULT_SINK_STD


@dataclass(frozen=True)
class RecordOptions:
    """Settings of a recording (see :func:`attnprobe.record` for each one's meaning).

    Example:
        >>> RecordOptions(linear_stats=False).manifest(["model.layers.0.self_attn"])["stats_mode"]
        'one-pass'
    """

    linear_stats: bool = True
    hessians: bool = False
    two_pass: bool = False
    sink_std: float = DEFAULT_SINK_STD
    sink_alpha: float = DEFAULT_SINK_ALPHA
    candidate_floor_std: float | None = 1.0
    mask_token_id: int | None = None
    save_input_ids: bool = True

    def __post_init__(self) -> None:
        floor = self.candidate_floor_std
        if floor is not None and floor > self.sink_std:
            raise ValueError(
                f"candidate_floor_std={floor} is above sink_std={self.sink_std}: the recorded "
                "candidate rows would not cover the sinks. Use a floor at or below sink_std."
            )

    def manifest(self, targets: list[str], **extra: Any) -> dict[str, Any]:
        """The store manifest's ``options`` for a recording of the attention modules ``targets``."""
        return {
            "linear_stats": self.linear_stats or self.hessians,
            "hessians": self.hessians,
            "stats_mode": "two-pass" if self.two_pass else "one-pass",
            "sink_std": self.sink_std,
            "sink_alpha": self.sink_alpha,
            "candidate_floor_std": self.candidate_floor_std,
            "mask_token_id": self.mask_token_id,
            "save_input_ids": self.save_input_ids,
            "targets": list(targets),
            **extra,
        }


DEFAULTS = RecordOptions()
