"""The installed galmorph version, for model cards, logs and the User-Agent (one place)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("galmorph")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
