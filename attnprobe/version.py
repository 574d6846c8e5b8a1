"""The package version, in a module of its own so that the store can stamp it without importing
``attnprobe`` (whose ``__init__`` imports the store)."""

__version__ = "0.1.0"
