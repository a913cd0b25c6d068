"""The Shoal operator (kopf): reconciles ModelDeployments into worker pods."""
