"""Patch Diffusion on EDM in JAX/Flax."""

__version__ = "0.1.0"
