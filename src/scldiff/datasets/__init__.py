"""Real datasets bundled with scldiff (no network access)."""

from ._pbmc3k import pbmc3k

__all__ = ["pbmc3k"]
