"""attnprobe: record attention of diffusion language models across denoising steps.

Example:
    >>> import attnprobe
    >>> with attnprobe.record(model, "runs/demo", linear_stats=False) as store:
    ...     out = attnprobe.generate(model, prompt, mask_token_id=259, gen_length=8, steps=4)
    >>> attnprobe.open("runs/demo").attention_mass(0).shape  # (layers, batch, heads, keys)
    torch.Size([4, 1, 6, 16])

Subpackages (docs/DESIGN.md): ``layout`` (what the model is made of), ``recording`` (hooks → mass and
input statistics), ``store`` (the on-disk trajectory store), ``analysis`` (sinks, metrics, figures),
``denoising`` (calibration and generation); ``distributed`` holds the collectives.
"""

import sys as _sys

from attnprobe.analysis.sinks import (
    DEFAULT_SINK_ALPHA,
    DEFAULT_SINK_STD,
    sink_scores,
    sink_weights,
    step_mass,
)
from attnprobe.denoising.calibrate import calibrate, calibration_steps
from attnprobe.denoising.sampler import generate
from attnprobe.distributed import (
    all_gather_object,
    all_reduce_sum_,
    barrier,
    broadcast_tensor,
    check_agreement,
    group_from_env,
    init_from_env,
    raise_if_any_failed,
    rank,
    shard_range,
    world_size,
)
from attnprobe.layout.experts import (
    ExpertSet,
    discover_experts,
    expert_activation,
    expert_weight,
    routed_rows,
)
from attnprobe.layout.experts import attach as attach_expert_hooks
from attnprobe.layout.registry import ModelLayout, discover
from attnprobe.moved_modules import alias_moved_modules
from attnprobe.recording.block_cosine import CosineProbe, token_cosine
from attnprobe.recording.block_mass import BlockMassRecording
from attnprobe.recording.expert_stats import reduce_experts
from attnprobe.recording.linear_stats import reduce_inputs
from attnprobe.recording.record import Recording, record
from attnprobe.recording.row_stats import row_statistics
from attnprobe.store.files import atomic_write
from attnprobe.store.fingerprint import fingerprint_problems, model_fingerprint
from attnprobe.store.opening import open_store as open
from attnprobe.store.reader import StoreError, TrajectoryStore
from attnprobe.store.shards import ShardedStore
from attnprobe.version import __version__


def cli_main(argv=None, **options):
    """The ``attnprobe`` command line (:func:`attnprobe.cli.main`; ``prune`` adds its commands through
    ``extra_commands=``). Imported on first call, so that ``python -m attnprobe.cli`` runs the module
    fresh."""
    from attnprobe.cli import main

    return main(argv, **options)


# Old flat module paths (before the subpackages), kept for one release with a DeprecationWarning.
alias_moved_modules(
    _sys.modules[__name__],
    {
        "attention_hooks": "attnprobe.recording.attention_hooks",
        "block_mass": "attnprobe.recording.block_mass",
        "capture": "attnprobe.recording.capture",
        "mass": "attnprobe.recording.mass",
        "record": "attnprobe.recording.record",
        "input_hooks": "attnprobe.recording.input_hooks",
        "step_reduce": "attnprobe.recording.step_reduce",
        "linear_stats": "attnprobe.recording.linear_stats",
        "registry": "attnprobe.layout.registry",
        "store_writer": "attnprobe.store.writer",
        "store_format": "attnprobe.store.format",
        "shards": "attnprobe.store.shards",
        "fingerprint": "attnprobe.store.fingerprint",
        "plot": "attnprobe.analysis.plot",
        "calibrate": "attnprobe.denoising.calibrate",
        "sampler": "attnprobe.denoising.sampler",
        "sinks": "attnprobe.analysis.sinks",
        "trajectory": "attnprobe.analysis.trajectory",
        "experts": "attnprobe.layout.experts",
    },
)

# The public API: functions and classes. `prune` builds only on these names (never on attnprobe's
# internal modules); tests/house/test_layout.py checks it.
__all__ = [
    # process groups (no-ops without one): attnprobe.distributed
    "all_gather_object",
    "all_reduce_sum_",
    "barrier",
    "broadcast_tensor",
    "check_agreement",
    "group_from_env",
    "init_from_env",
    "raise_if_any_failed",
    "rank",
    "shard_range",
    "world_size",
    # the rest
    "alias_moved_modules",
    "atomic_write",
    "attach_expert_hooks",
    "reduce_experts",
    "DEFAULT_SINK_ALPHA",
    "DEFAULT_SINK_STD",
    "sink_scores",
    "sink_weights",
    "step_mass",
    "BlockMassRecording",
    "CosineProbe",
    "ExpertSet",
    "ModelLayout",
    "Recording",
    "ShardedStore",
    "StoreError",
    "TrajectoryStore",
    "calibrate",
    "cli_main",
    "calibration_steps",
    "discover",
    "discover_experts",
    "expert_weight",
    "fingerprint_problems",
    "model_fingerprint",
    "generate",
    "open",
    "record",
    "reduce_inputs",
    "routed_rows",
    "token_cosine",
    "row_statistics",
    "expert_activation",
    "__version__",
]
