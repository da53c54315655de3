"""The gateway connection flags of client commands: target, TLS and API key."""

from __future__ import annotations

from pathlib import Path

from explainserve.client import TOKEN_ENV, ExplainClient


def add_connection_arguments(parser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default="127.0.0.1:50051", help="gateway host:port")
    group.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    group.add_argument("--tls-ca", type=Path, metavar="PEM", help="connect with TLS, trusting this CA (implies --tls)")
    group.add_argument("--tls-client-cert", type=Path, metavar="PEM", help="client certificate, for mutual TLS")
    group.add_argument("--tls-client-key", type=Path, metavar="PEM", help="the client certificate's key")
    group.add_argument("--token", help=f"API key (default ${TOKEN_ENV}; prefer the variable: a flag shows in `ps`)")


def connect(args) -> ExplainClient:
    """An ExplainClient for the parsed connection flags."""
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        raise ValueError("--tls-client-cert and --tls-client-key go together")
    return ExplainClient(args.target, tls=args.tls, tls_ca=args.tls_ca, tls_client_cert=args.tls_client_cert,
                         tls_client_key=args.tls_client_key, token=args.token)
