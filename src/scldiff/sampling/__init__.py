"""Count sampling: :func:`draw_counts`, compiled kernels on a CPU, torch on a GPU."""

from ._draw import compile_kernels, draw_counts

__all__ = ["compile_kernels", "draw_counts"]
