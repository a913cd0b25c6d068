"""`shoal` command line: one entry point, one subcommand per component.

Each subcommand lives in its component's module, which exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when
their subcommand runs, so `shoal --help` stays fast and `shoal operator` does not
import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("shoal.runtime.cli", "run one worker: the engine and its OpenAI-compatible server"),
    "gateway": ("shoal.runtime.gateway.cli", "one OpenAI endpoint routing to every pool"),
    "operator": ("shoal.operator.cli", "run the ModelDeployment operator (kopf)"),
    "dev-cluster": ("shoal.e2e.cli", "a local Kubernetes cluster: up | down | status"),
    "tiny-model": ("shoal.runtime.testing.cli", "write a tiny random-weight checkpoint"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Elastic multi-model LLM serving on Kubernetes."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen one pays for its imports
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
