"""Methods: pure scoring and mask selection — magnitude, Wanda, SparseGPT, masks (unstructured,
N:M) and structured (heads, channels)."""
