"""Engine: how pruning runs — one-shot from a store (``apply``), block-wise sequential with onloading,
across a process group, and the MoE glue — and what it reports."""
