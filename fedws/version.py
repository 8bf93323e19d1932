"""The package version, importable without importing torch (the CLI starts fast)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
