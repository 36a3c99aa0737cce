"""Measurements, not tests: throughput against the original recipe and data-loading speed (see README.md here)."""
