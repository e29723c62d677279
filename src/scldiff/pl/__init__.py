"""Plots of generated against real cells."""

from ._plots import library_and_zeros, mean_variance, real_vs_generated_umap, zeros_per_cell

__all__ = ["library_and_zeros", "mean_variance", "real_vs_generated_umap", "zeros_per_cell"]
