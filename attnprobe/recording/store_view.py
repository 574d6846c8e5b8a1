"""The reading side of a :class:`~attnprobe.Recording`: the object bound by ``with attnprobe.record(model)
as store`` reads like the store it writes, during and after the block."""

from __future__ import annotations

from collections.abc import Iterator

from attnprobe.store.reader import TrajectoryStore

# What `store.<name>` may mean on a Recording: the reading API of the store it writes.
_READING_API = frozenset(name for name in dir(TrajectoryStore) if not name.startswith("_"))


class StoreView:
    """Mixin of :class:`~attnprobe.Recording`: forwards the store's reading API to the store being
    written (``self._writer.store``) and explains, instead of failing obscurely, a use before ``with``."""

    @property
    def store(self):
        """The :class:`~attnprobe.TrajectoryStore` being written (after the block: the store it wrote)."""
        if self._writer is None:
            raise RuntimeError(self._not_started("store"))
        return self._writer.store

    @property
    def closed(self) -> bool:
        """True once the ``with`` block has ended (Hessians, if any, are on disk)."""
        return self._state == "closed"

    def _not_started(self, what: str) -> str:
        return (
            f"{what} was used on a Recording that has not started: record() returns a context manager. "
            "Use it as `with attnprobe.record(model) as store: ...`, then read `store` in or after the block."
        )

    def __getattr__(self, name: str):
        # Only called for attributes Recording lacks: forward the store's reading API.
        if name.startswith("_"):
            raise AttributeError(name)
        if self.__dict__.get("_writer") is None:
            if name in _READING_API:
                raise RuntimeError(self._not_started(f"store.{name}"))
            raise AttributeError(name)
        return getattr(self._writer.store, name)

    def __len__(self) -> int:
        return self.store.num_steps

    def __bool__(self) -> bool:  # a recording is truthy even before it starts (len() would raise)
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __repr__(self) -> str:
        if self._writer is None:
            name = type(self.model).__name__
            return f"Recording({name}, not started: use `with attnprobe.record(model) as store:`)"
        state = "recording" if self._state == "open" else "closed"
        return f"{self.store!r} [{state}]"
