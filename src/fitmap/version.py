"""fitmap's version, in one place (the package, the cache keys)."""

__version__ = "0.1.0"
