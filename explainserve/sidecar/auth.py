"""Client authentication of the public API: bearer API keys, stored as hashes, re-read on change.

``--auth-keys FILE`` names a JSON file of the keys that may call the API::

    {"keys": [
      {"name": "checkout-service", "sha256": "<hex sha256 of the key>"},
      {"name": "audit-team", "sha256": "...", "models": ["demo_image"]}
    ]}

A client sends ``authorization: Bearer <key>`` with every call. The file holds only each key's
sha256 (keys are 256-bit random tokens from ``explainserve api-key``, so a plain hash suffices:
there is nothing to guess), which makes the file, a Kubernetes Secret, safe to read by anyone
who may read the pod's configuration, and comparisons run in constant time. A key with
``models`` may only call those models (Explain, Score, ScoreColumns, ScoreBatch: every request's
model; ScoreStream: every message's).

- no ``authorization`` metadata, or not ``Bearer``: UNAUTHENTICATED;
- a key not in the file, or a model the key may not call: PERMISSION_DENIED.

Every refusal is counted in ``explainserve_refused_requests_total{rpc, reason}`` and logged
with the key's name (never the key). Health checks and reflection stay open (probes carry no
key). The file is re-read when its inode, size or mtime changes (a rotated Secret swaps a
symlink); a file that does not parse keeps the previous keys in use and logs why, so a bad edit
cannot lock every client out; a missing or malformed file at start-up is an error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from .admission import GuardInterceptor

log = logging.getLogger(__name__)
UNAUTHENTICATED, PERMISSION_DENIED = "unauthenticated", "permission_denied"
KEY_PREFIX = "es_"


def new_key() -> str:
    """A fresh API key: ``es_`` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One entry of the keys file. ``models`` None: every model."""

    name: str
    sha256: str
    models: frozenset | None = None


def parse_keys(text: str, source: str) -> tuple[ApiKey, ...]:
    """The entries of a keys file; ValueError naming the entry and field that is wrong."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{source}: not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f'{source}: expected {{"keys": [{{"name": ..., "sha256": ..., "models": [...]}}, ...]}}')
    keys = []
    for index, entry in enumerate(document["keys"]):
        where = f"{source}: keys[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"{where}.name: a non-empty string is required")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}.sha256: expected 64 lower-case hex digits (the key's sha256)")
        models = entry.get("models")
        if models is not None and (not isinstance(models, list) or not models
                                   or not all(isinstance(m, str) and m for m in models)):
            raise ValueError(f"{where}.models: expected a non-empty list of model names, or no `models` (every model)")
        keys.append(ApiKey(entry["name"], digest, frozenset(models) if models is not None else None))
    return tuple(keys)


class KeyRing:
    """The keys of ``--auth-keys``, re-read when the file changes.

    Raises
    ------
    ValueError
        At construction, when the file is missing or malformed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._keys = parse_keys(self._read(), str(self.path))
        log.info("API keys: %d from %s", len(self._keys), self.path)

    def _stat(self):
        try:
            stat = self.path.stat()
        except OSError as error:
            raise ValueError(f"--auth-keys {self.path}: {error}") from None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except OSError as error:
            raise ValueError(f"--auth-keys {self.path}: {error}") from None

    def keys(self) -> tuple[ApiKey, ...]:
        """The keys in use, re-read first if the file changed (a few microseconds when it did not)."""
        with self._lock:
            try:
                signature = self._stat()
                if signature != self._signature:
                    self._signature = signature
                    self._keys = parse_keys(self._read(), str(self.path))
                    log.info("API keys re-read: %d from %s", len(self._keys), self.path)
            except ValueError as error:
                log.error("API keys: keeping the %d keys in use: %s", len(self._keys), error)
            return self._keys

    def find(self, key: str) -> ApiKey | None:
        """The entry of ``key``, compared in constant time with every entry; None if unknown."""
        digest = key_sha256(key)
        found = None
        for entry in self.keys():
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found


def requested_models(request) -> set[str]:
    """The models a request names: ``model`` (Explain, Score, ScoreColumns), ``model_name`` (Open Inference
    Protocol's ModelInfer) or ``name`` (its ModelReady, ModelMetadata), or every ``requests[i].model``
    (ScoreBatch); empty for calls about no model."""
    fields = request.DESCRIPTOR.fields_by_name
    if "model" in fields:
        return {request.model}
    if "model_name" in fields:
        return {request.model_name}
    if "name" in fields and request.DESCRIPTOR.full_name.startswith("inference.Model"):
        return {request.name}
    if "requests" in fields:
        return {entry.model for entry in request.requests}
    return set()


def bearer_key(context) -> str | None:
    """The key of the call's ``authorization: Bearer <key>`` metadata, None without one."""
    for name, value in context.invocation_metadata() or ():
        if name == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):].strip() or None
    return None


class AuthInterceptor(GuardInterceptor):
    """Refuses calls of the API services without a known key, or for a model the key may not call."""

    def __init__(self, ring: KeyRing, refused):
        super().__init__(refused)
        self.ring = ring

    @asynccontextmanager
    async def guard(self, rpc: str, request, context):
        key = bearer_key(context)
        if key is None:
            await self.refuse(context, rpc, UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                              "no API key: send the metadata `authorization: Bearer <key>`")
        entry = self.ring.find(key)
        if entry is None:
            await self.refuse(context, rpc, PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED,
                              "the API key is not valid")

        async def check(message) -> None:
            denied = sorted(requested_models(message) - entry.models) if entry.models is not None else []
            if denied:
                log.warning("API key %r may not call model(s) %s", entry.name, denied)
                await self.refuse(context, rpc, PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED,
                                  f"the API key {entry.name!r} may not call model(s) {denied}")

        if request is not None:
            await check(request)
        yield check
