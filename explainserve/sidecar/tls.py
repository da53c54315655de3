"""TLS of the public API: the server's certificate and key, and optionally a CA for client
certificates (mutual TLS), re-read when the files change.

gRPC asks :meth:`ServerCertificates.fetch` before each new handshake; it answers a new
configuration only when a file's inode, size or mtime changed (cert-manager and Kubernetes
Secrets replace files by swapping a symlink) and the new pair loads, so rotated certificates are
served without a restart and connections already open keep theirs. A pair that does not load
(half-written, key and certificate that do not match) keeps the previous one in use and logs why.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class ServerCertificates:
    """``--tls-cert`` / ``--tls-key`` and the optional ``--tls-client-ca``.

    Raises
    ------
    ValueError
        At construction, when a file is missing or the certificate and key do not load as a pair.
    """

    def __init__(self, cert: str | os.PathLike, key: str | os.PathLike, client_ca: str | os.PathLike | None = None):
        self.paths = tuple(Path(p) for p in (cert, key, client_ca) if p is not None)
        self.mutual = client_ca is not None
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._config = self._load()
        log.info("TLS with %s%s", self.paths[0], f", client certificates signed by {self.paths[2]} required"
                 if self.mutual else "")

    def _stat(self) -> tuple:
        try:
            return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (path.stat() for path in self.paths))
        except OSError as error:
            raise ValueError(f"TLS: {error}") from None

    def _load(self):
        cert, key = self.paths[:2]
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)  # a matching pair
            chain, private = cert.read_bytes(), key.read_bytes()
            client_ca = self.paths[2].read_bytes() if self.mutual else None
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"TLS: --tls-cert {cert} and --tls-key {key} do not load as a pair: {error}") from None
        return grpc.ssl_server_certificate_configuration([(private, chain)], root_certificates=client_ca)

    def fetch(self):
        """A new configuration when the files changed and load, else None (keep the one in use)."""
        with self._lock:
            try:
                signature = self._stat()
                if signature == self._signature:
                    return None
                self._signature = signature
                self._config = self._load()
            except ValueError as error:
                log.error("keeping the TLS certificate in use: %s", error)
                return None
            log.info("TLS certificate re-read from %s", self.paths[0])
            return self._config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config, self.fetch,
                                                   require_client_authentication=self.mutual)
