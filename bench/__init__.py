"""Reproducible benchmarks of agentbus against hand-written baselines (see bench/README.md)."""
