"""The Shoal gateway: one OpenAI-compatible endpoint in front of every pool.

Modules, one reason to change each:

- ``pools``: what a worker and a pool are, and how they are read from Kubernetes objects
  (pure functions).
- ``routing``: which worker gets a request (pure).
- ``load``: parsing a worker's ``/metrics`` into its load (pure).
- ``state``: the gateway's live view (pools, in-flight counts, scraped load).
- ``discovery``: keeping that view current from the Kubernetes API or a static list.
- ``scraper``: polling each worker's ``/metrics``.
- ``metrics``: the gateway's own ``shoal_gateway_*`` series.
- ``errors``: OpenAI-style error bodies.
- ``app``: the FastAPI proxy.
- ``cli``: ``shoal gateway``.
"""
