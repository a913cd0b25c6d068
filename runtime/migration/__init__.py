"""Live request migration between workers (Llumnix-style) and drain.

A source worker moves a running request, with its KV blocks, to a target worker in
stages while it keeps decoding, then stops it briefly to copy the last blocks and its
state, and the target resumes it. See docs/migration.md.

- `state.py`: a request's state to bytes and back (pure)
- `kv.py`: what runs on the engine's step thread (read, pause, install, ...)
- `source.py`: the staged protocol, source side; `target.py`: the target side
- `drain.py`: moving every request off a worker; `service.py`: the gRPC server
- `marker.py`: how a stream tells the gateway where its request went (pure)
- `metrics.py`: Prometheus series; `codegen.py`: regenerates the *_pb2 files
"""
