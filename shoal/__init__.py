"""Shoal: elastic multi-model LLM serving on Kubernetes."""
