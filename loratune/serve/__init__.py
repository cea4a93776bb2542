"""Serving many adapters on one base: continuous batching with per-row adapters (``engine``)."""
