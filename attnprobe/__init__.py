"""attnprobe: record attention of diffusion language models across denoising steps.

Example:
    >>> import attnprobe
    >>> with attnprobe.record(model, "runs/gen", linear_stats=False) as store:  # doctest: +SKIP
    ...     attnprobe.generate(model, prompt, mask_token_id=126336, steps=64)
    >>> attnprobe.open("runs/gen").attention_mass(0).shape                        # doctest: +SKIP
"""

from attnprobe import distributed, experts, sinks, trajectory
from attnprobe.block_mass import BlockMassRecording
from attnprobe.calibrate import calibrate, calibration_steps
from attnprobe.experts import ExpertSet, discover_experts, expert_weight
from attnprobe.fingerprint import fingerprint_problems, model_fingerprint
from attnprobe.linear_stats import reduce_inputs
from attnprobe.record import Recording, record
from attnprobe.registry import ModelLayout, discover
from attnprobe.sampler import generate
from attnprobe.shards import ShardedStore
from attnprobe.store import StoreError, TrajectoryStore
from attnprobe.store import open_store as open

__version__ = "0.1.0"

# The public API. `prune` builds only on these names (never on attnprobe's internal modules).
__all__ = [
    "BlockMassRecording",
    "ExpertSet",
    "ModelLayout",
    "Recording",
    "ShardedStore",
    "StoreError",
    "TrajectoryStore",
    "calibrate",
    "calibration_steps",
    "discover",
    "distributed",
    "discover_experts",
    "experts",
    "expert_weight",
    "fingerprint_problems",
    "model_fingerprint",
    "generate",
    "open",
    "record",
    "reduce_inputs",
    "sinks",
    "trajectory",
    "__version__",
]
