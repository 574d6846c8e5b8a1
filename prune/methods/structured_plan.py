"""A structured plan as data: what each attention module and MLP keeps, and how it was chosen; written
to and read from JSON (``save_plan`` / ``load_plan``). Made by
:func:`prune.methods.structured.plan_structured`, applied by :func:`prune.methods.shrink.apply_plan`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODES = ("uniform", "global")
PLAN_FORMAT = "attnprobe-structured-plan"
PLAN_VERSION = 1


@dataclass
class StructuredPlan:
    """What to keep, per module, and how it was chosen. JSON-able through :meth:`to_dict`.

    Attributes:
        keep_heads: attention module name -> kept query-head indices (sorted; whole KV groups).
        keep_channels: MLP (or block) name -> kept intermediate channel indices (sorted).
        ratio: requested fraction removed.
        mode: ``"uniform"`` or ``"global"``.
        num_heads: attention name -> ``[num_heads, num_kv_heads, head_dim]`` of the dense model.
        widths: MLP name -> dense intermediate size.
        head_scores: attention name -> score of every dense query head (metadata).
        bias_shift: linear name -> vector added to its bias (bias compensation; empty without it).
    """

    keep_heads: dict[str, list[int]]
    keep_channels: dict[str, list[int]]
    ratio: float
    mode: str
    num_heads: dict[str, list[int]] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    head_scores: dict[str, list[float]] = field(default_factory=dict)
    bias_shift: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (floats round-trip exactly through ``json``)."""
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredPlan:
        """Inverse of :meth:`to_dict`; raises ValueError on another format or a newer version."""
        if data.get("format") != PLAN_FORMAT or int(data.get("version", 0)) > PLAN_VERSION:
            raise ValueError(
                f"not a structured plan of version <= {PLAN_VERSION} (format={data.get('format')!r}, "
                f"version={data.get('version')!r}); write it with prune.methods.structured.save_plan."
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def save_plan(plan: StructuredPlan, path: str | Path) -> None:
    """Write ``plan`` as JSON.

    Example:
        >>> plan = StructuredPlan({"attn": [0, 2]}, {"mlp": [1]}, ratio=0.5, mode="uniform")
        >>> save_plan(plan, "plan.json")
        >>> load_plan("plan.json") == plan
        True
    """
    Path(path).write_text(json.dumps(plan.to_dict(), indent=1))


def load_plan(path: str | Path) -> StructuredPlan:
    """Read a plan written by :func:`save_plan`.

    Example:
        >>> save_plan(StructuredPlan({"attn": [0, 2]}, {}, ratio=0.5, mode="uniform"), "plan.json")
        >>> load_plan("plan.json").keep_heads
        {'attn': [0, 2]}
    """
    return StructuredPlan.from_dict(json.loads(Path(path).read_text()))
