"""Plots of generated against real cells."""

from ._plots import library_and_zeros, real_vs_generated_umap

__all__ = ["library_and_zeros", "real_vs_generated_umap"]
