"""``explainserve sidecar``: run the gateway in front of a running TorchServe."""

from __future__ import annotations

import logging

from explainserve.sidecar.server import GatewayConfig, run

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("sidecar", help="run the typed gRPC Explain gateway in front of TorchServe")
    defaults = GatewayConfig()
    parser.add_argument("--listen", default=defaults.listen, help="host:port of the public Explain API")
    parser.add_argument("--torchserve", default=defaults.torchserve_inference, help="TorchServe gRPC inference host:port")
    parser.add_argument("--torchserve-management", default=defaults.torchserve_management,
                        help="TorchServe gRPC management host:port")
    parser.add_argument("--metrics-port", type=int, default=defaults.metrics_port, help="port of /metrics")
    parser.add_argument("--metrics-address", default=defaults.metrics_address, help="address of /metrics")
    parser.add_argument("--metrics-per-class", action="store_true",
                        help="add a `class` label (the scored class id) to the anomaly counters (cardinality x classes)")
    parser.add_argument("--store-dir", default=defaults.store_dir, metavar="DIR",
                        help="distribution stores, one folder per model name (DIR/<model>/manifest.json); "
                             "without it Explain answers carry no anomaly verdict")
    parser.add_argument("--store-poll-interval", type=float, default=defaults.store_poll_interval, metavar="SECONDS",
                        help="seconds between checks of --store-dir for stores that changed, appeared or were "
                             "removed (a changed store is verified again before it is used); 0: only on SIGHUP")
    parser.add_argument("--poll-interval", type=float, default=defaults.poll_interval,
                        help="seconds between TorchServe pings and describe-model polls")
    parser.add_argument("--default-timeout", type=float, default=defaults.default_timeout,
                        help="seconds allowed for TorchServe when the client sets no deadline")
    parser.add_argument("--token-file", default=defaults.token_file, metavar="PATH",
                        help="TorchServe's key_file.json (token authorisation): the inference key is sent with "
                             "Predictions/Ping, the management key with DescribeModel; re-read when it changes")
    parser.add_argument("--explain-anomaly", action="store_true", default=defaults.explain_anomaly,
                        help="for an ANOMALOUS verdict, also find the region that triggered its most surprising "
                             "filter (one more TorchServe call) unless the request sets explain_anomaly=false")
    parser.add_argument("--max-concurrent-requests", type=int, default=defaults.max_concurrent_requests, metavar="N",
                        help="API calls at work at once (health checks are not counted)")
    parser.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests, metavar="N",
                        help="API calls waiting for a turn beyond --max-concurrent-requests; more are refused at "
                             "once with RESOURCE_EXHAUSTED")
    parser.add_argument("--max-connection-age", type=float, default=defaults.max_connection_age, metavar="SECONDS",
                        help="close client connections after this long (gracefully), so clients spread over new pods")
    parser.add_argument("--health-listen", metavar="HOST:PORT",
                        help="also serve grpc.health.v1 alone, in plaintext, here (for kubelet gRPC probes, which "
                             "cannot speak TLS); its service 'liveness' is SERVING while the gateway answers")
    parser.add_argument("--drain-seconds", type=float, default=defaults.drain_seconds, metavar="SECONDS",
                        help="on SIGTERM: health NOT_SERVING, new calls refused, and calls in flight get this long "
                             "to finish before the gateway exits")
    security = parser.add_argument_group("security of the public port (docs/SECURITY.md)")
    security.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (re-read when it changes)")
    security.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (re-read when it changes)")
    security.add_argument("--tls-client-ca", metavar="PEM",
                          help="require client certificates signed by this CA (mutual TLS); needs --tls-cert")
    security.add_argument("--auth-keys", metavar="JSON",
                          help="bearer API keys a caller must send, as sha256 hashes, optionally limited to models "
                               "(make one with `explainserve api-key`); re-read when the file changes")
    security.add_argument("--allow-unauthenticated", action="store_true",
                          help="serve callers without an API key on a non-loopback --listen address (refused "
                               "otherwise: only when something in front authenticates them)")
    security.add_argument("--reflection", action="store_true",
                          help="enable gRPC server reflection (it lists the API to any caller; off by default)")
    parser.set_defaults(func=main)


def is_loopback(listen: str) -> bool:
    """Whether a host:port address only accepts connections from this host."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.poll_interval <= 0 or args.default_timeout <= 0:
        raise ValueError("--poll-interval and --default-timeout must be positive seconds")
    if args.store_poll_interval < 0:
        raise ValueError("--store-poll-interval must be 0 (only on SIGHUP) or positive seconds")
    if args.max_concurrent_requests < 1 or args.max_queued_requests < 0:
        raise ValueError("--max-concurrent-requests must be >= 1 and --max-queued-requests >= 0")
    if args.drain_seconds < 0:
        raise ValueError("--drain-seconds must be 0 or positive seconds")
    if args.max_connection_age <= 0:
        raise ValueError("--max-connection-age must be positive seconds")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise ValueError("--tls-cert and --tls-key go together, and --tls-client-ca needs them")
    exposed = not is_loopback(args.listen)
    if exposed and not args.auth_keys and not args.allow_unauthenticated:
        raise ValueError(f"--listen {args.listen} is reachable from other hosts and no --auth-keys is given: any "
                         "caller would be served; pass --auth-keys FILE, or --allow-unauthenticated if something in "
                         "front authenticates callers")
    if exposed and not args.tls_cert:
        log.warning("--listen %s is reachable from other hosts WITHOUT TLS: API keys and images cross the network "
                    "in clear text; pass --tls-cert and --tls-key unless a proxy or mesh in front encrypts them",
                    args.listen)
    if exposed and args.allow_unauthenticated and not args.auth_keys:
        log.warning("--allow-unauthenticated: every caller that reaches %s is served", args.listen)
    run(GatewayConfig(listen=args.listen, torchserve_inference=args.torchserve,
                      torchserve_management=args.torchserve_management, metrics_port=args.metrics_port,
                      metrics_address=args.metrics_address, metrics_per_class=args.metrics_per_class,
                      store_dir=args.store_dir, store_poll_interval=args.store_poll_interval,
                      poll_interval=args.poll_interval,
                      default_timeout=args.default_timeout, token_file=args.token_file,
                      explain_anomaly=args.explain_anomaly, max_concurrent_requests=args.max_concurrent_requests,
                      max_queued_requests=args.max_queued_requests, max_connection_age=args.max_connection_age,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                      auth_keys=args.auth_keys, reflection=args.reflection, drain_seconds=args.drain_seconds,
                      health_listen=args.health_listen))
    return 0
