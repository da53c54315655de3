"""The ``explainserve`` command line.

Every sub-command lives in its own module, which exposes ``register(subparsers)``;
the module adds its parser and sets ``func`` to a callable taking the parsed arguments
and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "explainserve.commands.demo",
    "explainserve.commands.sidecar",
    "explainserve.commands.api_key",
    "explainserve.commands.serve",
    "explainserve.commands.archive",
    "explainserve.commands.explain",
    "explainserve.commands.distributions",
    "explainserve.commands.train_demo",
)


def build_parser(modules=COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="explainserve",
        description="Explanations (SWAG, SWAG-V, Jitter-CAM, Grad-CAM) and anomaly verdicts for CNN classifiers.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A command named like its module needs only that module: `explainserve sidecar` then
    # starts without importing torch (seconds), which matters when the gateway restarts.
    own_module = f"explainserve.commands.{argv[0].replace('-', '_')}" if argv else ""
    args = build_parser((own_module,) if own_module in COMMAND_MODULES else COMMAND_MODULES).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as error:
        print(f"explainserve {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
