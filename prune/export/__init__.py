"""Export: what pruning leaves on disk — bit-packed mask files and checkpoints."""
