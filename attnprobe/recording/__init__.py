"""Recording: hooks on a model's attention and block linears that turn each denoising step into
attention mass and input statistics (``record()``), and the block-by-block mass pass."""
