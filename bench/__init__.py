"""Serving benchmark: Shoal against vLLM's CPU build and transformers static batching.

Run with `make bench` (or `python -m bench.serving --help`). Not a test: it measures.
"""
