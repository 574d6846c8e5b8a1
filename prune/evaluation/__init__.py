"""Evaluation: how good a pruned model is — masked-diffusion NLL and the lm-eval model ``attnprobe``."""
