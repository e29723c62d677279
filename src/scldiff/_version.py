"""The installed version of scldiff."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scldiff")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
