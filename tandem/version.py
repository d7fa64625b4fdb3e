"""The package version (a leaf: the API server and benchmarks read it without importing the package root)."""

__version__ = "0.1.0"
