"""``explainserve demo`` (``make demo``): archive the demo models, serve them, explain samples."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="build, serve and query the demo models end to end")
    parser.set_defaults(func=main)


def main(args) -> int:
    raise ValueError("the demo models are not available in this build yet")
