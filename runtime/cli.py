"""`shoal serve`: run one worker, the engine and its OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys

log = logging.getLogger("shoal.serve")

EPILOG = """\
examples:
  # make a tiny random-weight model, then serve it on http://127.0.0.1:8000/v1
  shoal tiny-model --arch llama --out /tmp/tiny-llama
  shoal serve --model /tmp/tiny-llama

  # a real checkpoint in bfloat16, reachable from other machines, 4 GiB of KV cache
  shoal serve --model /models/Llama-3.2-1B-Instruct --dtype bfloat16 \\
      --host 0.0.0.0 --port 8000 --kv-cache-memory 4GiB --served-model-name llama-1b

then, from another shell:
  curl http://127.0.0.1:8000/health                  # 503 while loading, 200 when ready
  curl http://127.0.0.1:8000/v1/models
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}]}'
  curl http://127.0.0.1:8000/metrics                 # Prometheus metrics

The model directory is a Hugging Face checkpoint: config.json, *.safetensors and the
tokenizer files. Any OpenAI client works: point its base_url at http://HOST:PORT/v1.
"""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
    "ti": 1024**4,
}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '4Gi' or plain bytes -> bytes (GB is 10^9, GiB 2^30)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write it like 2GiB, 512MiB, 1.5GB or a number of bytes"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be more than 0 bytes")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write it as NAME=DIR")
    return name.strip(), path.strip()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Run one worker: load a model, then serve the OpenAI API (/v1/completions,\n"
        "/v1/chat/completions with streaming, /v1/models), /health and /metrics.\n"
        "The server listens at once; /health answers 503 until the model is loaded."
    )
    parser.epilog = EPILOG
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", required=True, metavar="DIR", help="Hugging Face model directory to serve"
    )
    model.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the name clients put in 'model' (default: the directory's name)",
    )
    model.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation type (default: auto, the checkpoint's torch_dtype)",
    )
    model.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (default: auto, a GPU when one is visible)",
    )
    model.add_argument(
        "--max-model-len",
        type=_positive_int,
        metavar="TOKENS",
        help="context window: prompt plus output tokens (default: the model's own)",
    )

    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=64,
        metavar="N",
        help="most sequences batched in one step (default: 64)",
    )
    engine.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=2048,
        metavar="N",
        help="token budget of one step; longer prompts prefill in chunks (default: 2048)",
    )
    engine.add_argument(
        "--block-size",
        type=_positive_int,
        default=16,
        metavar="TOKENS",
        help="tokens per KV cache block (default: 16)",
    )
    kv = engine.add_mutually_exclusive_group()
    kv.add_argument(
        "--num-kv-blocks",
        type=_positive_int,
        metavar="N",
        help="size the KV cache by block count",
    )
    kv.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=1 << 30,
        metavar="SIZE",
        help="size the KV cache in memory, e.g. 2GiB or 512MiB (default: 1GiB)",
    )
    engine.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not share KV blocks between requests with the same prompt prefix",
    )
    engine.add_argument(
        "--no-chunked-prefill",
        action="store_true",
        help="prefill each prompt in one step instead of in budget-sized chunks",
    )
    engine.add_argument(
        "--seed", type=int, default=0, help="seed for requests without their own (default: 0)"
    )

    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument(
        "--lora",
        action="append",
        type=_lora_module,
        default=[],
        metavar="NAME=DIR",
        help="serve the PEFT adapter in DIR as model NAME (repeatable; more at run time "
        "through POST /v1/load_lora_adapter)",
    )
    lora.add_argument(
        "--max-lora-rank",
        type=_positive_int,
        default=16,
        metavar="R",
        help="largest adapter rank accepted (default: 16)",
    )
    lora.add_argument(
        "--max-loras",
        type=_positive_int,
        default=8,
        metavar="N",
        help="adapters resident for batching: most distinct adapters in one step (default: 8)",
    )
    lora.add_argument(
        "--max-cpu-loras",
        type=_positive_int,
        default=32,
        metavar="N",
        help="adapters kept in host memory; others are read from disk again (default: 32)",
    )

    server = parser.add_argument_group("server")
    server.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    server.add_argument(
        "--port", type=_port, default=8000, help="port (default: 8000; 0 picks a free one)"
    )
    server.add_argument(
        "--grpc-port",
        type=_port,
        default=50051,
        help="port of the migration/control gRPC service, on --host (default: 50051; "
        "0 picks a free one)",
    )
    server.add_argument(
        "--pool",
        default=os.environ.get("SHOAL_POOL", ""),
        help="the pool label on every metric (default: $SHOAL_POOL, else empty)",
    )
    server.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )


def check_model_dir(path: str) -> str | None:
    """Why `path` cannot be served, with the fix; None if it looks like a model."""
    if not os.path.exists(path):
        return (
            f"--model {path}: no such directory; pass a Hugging Face model directory "
            "(make a tiny one with `shoal tiny-model --out /tmp/tiny-llama`)"
        )
    if not os.path.isdir(path):
        return f"--model {path}: not a directory; pass the folder that holds config.json"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return (
            f"--model {path}: no config.json there; pass a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files)"
        )
    return None


def engine_config(args: argparse.Namespace):
    from shoal.runtime.config import EngineConfig

    return EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill,
        seed=args.seed,
        lora_modules=dict(args.lora),
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
    )


def bind(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a taken port fails at once with a clear message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class QuietProbes(logging.Filter):
    """Drop access-log lines for /health and /metrics: probes and scrapes come every few
    seconds and would bury the lines people read (loading and readiness are logged by
    the server itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            return args[2] not in ("/health", "/metrics")
        return True


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.log_level != "debug":
        logging.getLogger("uvicorn.access").addFilter(QuietProbes())
    problem = check_model_dir(args.model)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"error: {exc}; pick another --port or stop what uses it", file=sys.stderr)
        return 1

    import uvicorn

    from shoal.runtime.server.api_server import build_app

    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True  # a worker that cannot load must exit, not idle

    config = engine_config(args)
    app = build_app(
        config,
        pool=args.pool,
        on_load_error=on_load_error,
        grpc_port=args.grpc_port,
        grpc_host=args.host,
        http_port=sock.getsockname()[1],
    )
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level=args.log_level, timeout_graceful_shutdown=5)
    )
    url = url_for(args.host, sock.getsockname()[1])
    log.info(
        "listening on %s (OpenAI API at %s/v1, model name %r); the model loads in the "
        "background and %s/health answers 200 once it is ready",
        url,
        url,
        config.model_name,
        url,
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; with this
    # handler in place that re-raise is a no-op, so a pod stopped by Kubernetes exits 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if failure:
        exc = failure[0]
        print(f"error: could not load {args.model}: {exc}", file=sys.stderr)
        return 1
    return 0
