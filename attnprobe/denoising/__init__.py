"""Denoising: driving a DLM along a trajectory — the forward-noising calibration and generation."""
