"""Scripts that use the library: run from a checkout as ``python -m recipes.<name>``."""
