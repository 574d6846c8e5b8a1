"""attnprobe: record attention of diffusion language models across denoising steps.

Example:
    >>> import attnprobe                                                  # doctest: +SKIP
    >>> with attnprobe.record(model, "runs/gen", mask_token_id=126336) as store:
    ...     attnprobe.generate(model, prompt, mask_token_id=126336, steps=64)
    >>> attnprobe.open("runs/gen").attention_mass(0).shape
"""

from attnprobe import sinks
from attnprobe.calibrate import calibrate
from attnprobe.record import Recording, record
from attnprobe.sampler import generate
from attnprobe.store import TrajectoryStore
from attnprobe.store import open_store as open

__version__ = "0.1.0"

__all__ = ["Recording", "TrajectoryStore", "calibrate", "generate", "open", "record", "sinks", "__version__"]
