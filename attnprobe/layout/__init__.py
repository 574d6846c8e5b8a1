"""Layout: what a model is made of — its attention modules, blocks, block linears and MoE experts,
found without editing its modeling code."""
