"""hemaray: distributed batch processing of blood-smear and bone-marrow slides."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hemaray")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = ["__version__"]
