"""Store: the on-disk trajectory store — its format, the reader, the writer, the per-rank shards and
the fingerprint of the model it was recorded from (docs/DESIGN.md "Store layout")."""

from attnprobe.store.format import StoreError
from attnprobe.store.opening import open_store
from attnprobe.store.reader import TrajectoryStore

__all__ = ["StoreError", "TrajectoryStore", "open_store"]
