"""vidgen: video VAE + diffusion transformer training on sharded clip datasets."""
__version__ = "0.1.0"
