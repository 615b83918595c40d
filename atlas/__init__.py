"""atlas: activation atlases and feature visualisation for PyTorch vision models."""

__version__ = "0.1.0"
