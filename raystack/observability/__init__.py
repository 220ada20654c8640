"""Metrics exported through Ray."""
