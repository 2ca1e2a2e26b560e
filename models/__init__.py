"""Reference models for pyedge tests and benchmarks (see models/README.md)."""
