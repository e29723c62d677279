"""Real datasets bundled with scldiff (no network access)."""

from ._dlpfc import dlpfc_151673
from ._multiome import pbmc_multiome_subset
from ._pbmc3k import pbmc3k

__all__ = ["dlpfc_151673", "pbmc3k", "pbmc_multiome_subset"]
