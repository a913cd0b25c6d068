"""The local Kubernetes cluster for tests and the demo."""
