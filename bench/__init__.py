"""Benchmarks of dense_ext (not part of the installed package); see bench/README.md."""
