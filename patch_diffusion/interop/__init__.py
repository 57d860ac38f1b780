"""Readers and name mappings for weights made by other frameworks (PyTorch, diffusers)."""
