"""Benchmarks of the template (not imported by the project)."""
