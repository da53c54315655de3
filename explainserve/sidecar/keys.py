"""TorchServe's token-authorisation keys, sent with every gateway call to TorchServe.

With ``disable_token_authorization=false``, TorchServe 0.12 generates its keys at start-up
and writes them (mode 0600) to ``key_file.json`` in its working directory::

    {"management": {"key": "...", "expiration time": "..."},
     "inference": {"key": "...", "expiration time": "..."},
     "API": {"key": "..."}}

Its gRPC servers want the metadata ``authorization: Bearer <key>``: the inference key on
the inference port (Predictions, Ping), the management key on the management port
(DescribeModel, ListModels). A call without the right key is answered PERMISSION_DENIED
"Token Authorization failed. ..." (older releases used CANCELLED with the same text).

The file may appear after the gateway starts, and TorchServe rewrites it when it restarts
or a key is regenerated, so :class:`KeyFile` re-reads it whenever its mtime, size or inode
changes, and :class:`KeyInterceptor` re-reads it and retries once when TorchServe refuses a
key. A call that cannot be authorised fails with UNAVAILABLE and the reason (no file,
malformed file, key refused); the reason is logged each time it changes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import grpc

log = logging.getLogger(__name__)
KINDS = ("inference", "management")
REFUSED_TEXT = "Token Authorization failed"
REFUSED_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class KeyFileError(Exception):
    """The key file cannot be used now; the message says why."""


def is_refused(error: grpc.RpcError) -> bool:
    """Whether TorchServe refused the call's key."""
    return error.code() in REFUSED_CODES or (
        error.code() == grpc.StatusCode.CANCELLED and REFUSED_TEXT in (error.details() or ""))


class KeyFile:
    """The keys in TorchServe's ``key_file.json``, re-read when the file changes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature = None
        self._keys: dict[str, str] = {}
        self._problem: str | None = None  # what is wrong with the file, logged when it changes
        self._refusals: dict[str, str] = {}  # kind -> TorchServe's refusal of the current key

    def metadata(self, kind: str, *, reload: bool = False) -> tuple[tuple[str, str], ...]:
        """gRPC metadata carrying the ``kind`` key ('inference' or 'management').

        Raises KeyFileError with the reason when the file is missing or malformed.
        ``reload`` re-reads the file even if it looks unchanged.
        """
        with self._lock:
            try:
                stat = self.path.stat()
                signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                if reload or signature != self._signature:
                    keys = self._read()
                    if keys != self._keys:
                        log.info("read TorchServe's keys from %s", self.path)
                        self._refusals.clear()
                    self._keys, self._signature, self._problem = keys, signature, None
            except (OSError, KeyFileError) as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                problem = f"TorchServe key file {self.path}: {reason}"
                if problem != self._problem:
                    log.warning("%s; calls to TorchServe answer UNAVAILABLE until it is fixed", problem)
                self._keys, self._signature, self._problem = {}, None, problem
                raise KeyFileError(problem) from None
            return (("authorization", f"Bearer {self._keys[kind]}"),)

    def refused(self, kind: str, details: str) -> str:
        """Record that TorchServe refused the current ``kind`` key; returns the reason."""
        reason = f"TorchServe refused the {kind} key from {self.path}: {details}"
        with self._lock:
            if self._refusals.get(kind) != reason:
                log.warning("%s; calls to TorchServe answer UNAVAILABLE until the file holds its keys", reason)
                self._refusals[kind] = reason
        return reason

    def _read(self) -> dict[str, str]:
        try:
            content = json.loads(self.path.read_text(encoding="utf-8"))
            keys = {kind: content[kind]["key"] for kind in KINDS}
        except ValueError as error:
            raise KeyFileError(f"not JSON ({error})") from None
        except (KeyError, TypeError):
            raise KeyFileError(f"no {' and '.join(KINDS)} keys in it") from None
        if not all(isinstance(key, str) and key for key in keys.values()):
            raise KeyFileError("a key is empty or not a string")
        return keys

def unavailable(reason: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=reason)


class KeyInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the ``kind`` key to every unary call of a channel to TorchServe.

    When TorchServe refuses the key, the file is re-read and the call retried once; a
    second refusal, or a key file that cannot be read, ends the call with UNAVAILABLE.
    """

    def __init__(self, key_file: KeyFile, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind: one of {KINDS}, not {kind!r}")
        self.key_file = key_file
        self.kind = kind

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(self._with_key(client_call_details, reload=False), request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            if not is_refused(error):
                return call  # awaiting it again raises the same error for the caller
            self.key_file.refused(self.kind, error.details())
            call = await continuation(self._with_key(client_call_details, reload=True), request)
            try:
                await call
            except grpc.aio.AioRpcError as error:
                if is_refused(error):
                    raise unavailable(self.key_file.refused(self.kind, error.details())) from None
        return call

    def _with_key(self, details: grpc.aio.ClientCallDetails, *, reload: bool) -> grpc.aio.ClientCallDetails:
        try:
            key = self.key_file.metadata(self.kind, reload=reload)
        except KeyFileError as error:
            raise unavailable(str(error)) from None
        metadata = [item for item in (details.metadata or ()) if item[0] != "authorization"]
        return details._replace(metadata=grpc.aio.Metadata(*metadata, *key))
