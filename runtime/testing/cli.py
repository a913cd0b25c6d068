"""`shoal tiny-model`: write a tiny random-weight checkpoint (and tokenizer) to a folder."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from shoal.runtime.testing.factory import ARCH_ALIASES, ARCHS, PRESETS

    parser.description = (
        "Write a deterministic random-weight model directory (config.json, safetensors, "
        "tokenizer with a chat template) that `shoal serve --model DIR` and transformers "
        "both load. Nothing is downloaded."
    )
    parser.add_argument(
        "--arch",
        default="llama",
        metavar="ARCH",
        help=f"architecture: {', '.join(ARCHS)} (or an HF name such as "
        f"{next(iter(ARCH_ALIASES))}); default llama",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved weights (default float32)",
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=list(PRESETS),
        help="size: tiny (hidden 64, 2 layers) or bench-llama (hidden 512, 8 layers, "
        "vocab 32000); default tiny",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from shoal.runtime.testing.factory import make_tiny_model, resolve_arch

    try:
        arch = resolve_arch(args.arch)
    except ValueError as e:
        print(f"shoal tiny-model: {e}", file=sys.stderr)
        return 2
    path = make_tiny_model(arch, args.out, dtype=args.dtype, seed=args.seed, preset=args.preset)
    print(f"wrote {arch} ({args.preset}, {args.dtype}) to {path}")
    print(f"serve it with: shoal serve --model {path}")
    return 0
