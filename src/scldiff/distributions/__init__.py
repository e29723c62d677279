"""Count distributions: their parameters and sparse log-likelihoods (the bottom layer)."""

from ._likelihood import LIKELIHOODS, CountParams, Likelihood, sparse_log_likelihood, zinb_log_zero

__all__ = ["LIKELIHOODS", "CountParams", "Likelihood", "sparse_log_likelihood", "zinb_log_zero"]
