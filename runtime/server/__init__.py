"""The worker's OpenAI-compatible HTTP server: protocol types, the FastAPI app, metrics."""
