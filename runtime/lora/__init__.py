"""Multi-LoRA serving: PEFT adapters over the shared base weights, many in one batch.

- ``adapter``: read and check a PEFT adapter directory against the base model.
- ``layers``: the stacked slot weights per projection and the per-step token -> slot
  mapping that ``Linear`` applies.
- ``pool``: registered adapters, the host cache, the resident slots, pinning and LRU.
- ``metrics``: the adapter series on the worker's /metrics.
"""
