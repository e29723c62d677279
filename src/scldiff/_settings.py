"""Package-wide settings: :data:`scldiff.settings`."""

from __future__ import annotations


class Settings:
    """Settings of scldiff, as attributes of :data:`scldiff.settings`.

    Attributes
    ----------
    heap_tuning
        ``True`` (default): while :meth:`~scldiff.LapDDPM.train` and
        :meth:`~scldiff.LapDDPM.generate` run on Linux with glibc, the C heap keeps up to
        256 MiB of freed memory instead of handing it back to the system, so that the
        tensors each step allocates anew reuse memory pages rather than fault in fresh,
        zeroed ones (glibc's ``mallopt``; docs "Scaling", "Memory pages"). When they
        return, the kept memory goes back to the system (``malloc_trim``). ``False``
        leaves the allocator alone, as scldiff does anyway where ``MALLOC_*_``
        environment variables or ``glibc.malloc`` tunables configure it, and on other
        platforms.
    """

    def __init__(self) -> None:
        self._heap_tuning = True

    @property
    def heap_tuning(self) -> bool:
        return self._heap_tuning

    @heap_tuning.setter
    def heap_tuning(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"settings.heap_tuning must be True or False, got {value!r}.")
        self._heap_tuning = value

    def __repr__(self) -> str:
        return f"scldiff.settings(heap_tuning={self.heap_tuning})"


settings = Settings()
