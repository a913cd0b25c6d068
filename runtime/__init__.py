"""The Shoal runtime: one model instance (engine, OpenAI server), and the gateway."""
