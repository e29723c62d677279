"""Count sampling: :func:`draw_counts`, compiled kernels on a CPU, torch on a GPU."""

from ._draw import draw_counts

__all__ = ["draw_counts"]
