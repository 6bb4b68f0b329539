"""scgcm: Score-Guided Consistency Models in JAX and Equinox."""

__version__ = "0.1.0"
