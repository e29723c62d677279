"""Count sampling: :func:`draw_counts`, compiled kernels on a CPU, torch on a GPU; and
:func:`transport_counts`, observed counts carried to another distribution."""

from ._draw import compile_kernels, draw_counts
from ._transport import transport_counts

__all__ = ["compile_kernels", "draw_counts", "transport_counts"]
