"""An institution's signing keys (JWKS): static from the config, or fetched and cached.

Contract of a :class:`JwksSource`:

* :meth:`~JwksSource.get` returns the keys, fetching them when none are cached or the cache
  is older than ``cache_seconds``. A failed fetch keeps serving the last good keys (an
  identity provider's outage must not sign everybody out); with nothing cached it raises
  :class:`JwksUnavailable`.
* :meth:`~JwksSource.refresh` is for a token naming an unknown ``kid`` (the institution
  rotated its keys): it refetches, but at most once per ``min_refetch_seconds``, so a flood
  of tokens with made-up key ids cannot turn medrelay into a load generator against the
  institution. Concurrent callers share one fetch.
* :meth:`~JwksSource.cached` never does I/O (used to recognise another issuer's key).

Only public signature keys are kept: ``use: enc`` keys, symmetric (``oct``) keys and keys of
types joserfc cannot import are dropped with a log line; private parts are discarded.
Responses are bounded in size and number of keys (I7).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key, KeySet
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 64 * 1024
MAX_KEYS = 32
FETCH_TIMEOUT = 5.0


class JwksUnavailable(RequestError):
    """No keys for an institution: its JWKS endpoint failed and nothing is cached."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, "institution keys unavailable; try again")


class JwksSource(Protocol):
    async def get(self, now: int) -> KeySet: ...

    async def refresh(self, now: int) -> KeySet: ...

    def cached(self) -> KeySet | None: ...


def parse_jwks(doc: object, *, origin: str) -> KeySet:
    """Public signature keys of a JWKS document (see the module docstring for what is
    dropped). Raises ``ValueError`` for a document that is not a JWKS at all."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS")
    raw_keys: list[Any] = doc["keys"]
    if len(raw_keys) > MAX_KEYS:
        raise ValueError("too many keys")
    keys: list[Key] = []
    for raw in raw_keys:
        key = _public_key(raw, origin)
        if key is not None:
            keys.append(key)
    return KeySet(keys)


def _public_key(raw: object, origin: str) -> Key | None:
    if not isinstance(raw, dict) or raw.get("use", "sig") != "sig" or raw.get("kty") == "oct":
        log.info("jwks %s: skipping a key that is not a public signature key", origin)
        return None
    try:
        key = JWKRegistry.import_key(raw)
        if key.is_private:
            key = JWKRegistry.import_key(key.as_dict(private=False))
    except (JoseError, ValueError, TypeError, KeyError):
        log.warning("jwks %s: skipping a key that cannot be imported", origin)
        return None
    return key


class StaticJwks:
    """Keys written in the institutions file (an institution without a JWKS endpoint)."""

    def __init__(self, doc: object, *, origin: str) -> None:
        self._keys = parse_jwks(doc, origin=origin)

    async def get(self, now: int) -> KeySet:
        return self._keys

    async def refresh(self, now: int) -> KeySet:
        return self._keys

    def cached(self) -> KeySet | None:
        return self._keys


class RemoteJwks:
    """Keys fetched from ``url`` with the injected ``httpx.AsyncClient``."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        cache_seconds: int = 3600,
        min_refetch_seconds: int = 60,
    ) -> None:
        self.url = url
        self._client = client
        self.cache_seconds = cache_seconds
        self.min_refetch_seconds = min_refetch_seconds
        self._keys: KeySet | None = None
        self._fetched_at: int | None = None
        self._attempted_at: int | None = None
        self._forced_at: int | None = None
        self._attempts = 0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RemoteJwks({self.url!r})"

    def cached(self) -> KeySet | None:
        return self._keys

    async def get(self, now: int) -> KeySet:
        fresh = self._fetched_at is not None and now - self._fetched_at < self.cache_seconds
        if self._keys is not None and fresh:
            return self._keys
        return await self._fetch(now, forced=False)

    async def refresh(self, now: int) -> KeySet:
        return await self._fetch(now, forced=True)

    async def _fetch(self, now: int, *, forced: bool) -> KeySet:
        """``forced`` (an unknown kid) is rate limited on its own clock, so a genuine
        rotation just after a scheduled fetch still gets through; a scheduled refetch of a
        stale cache is limited likewise, so an outage is not hammered."""
        seen = self._attempts
        async with self._lock:
            if self._attempts != seen and self._keys is not None:
                return self._keys  # another caller fetched while this one waited
            last = self._forced_at if forced else self._attempted_at
            if (
                self._keys is not None
                and last is not None
                and now - last < self.min_refetch_seconds
            ):
                return self._keys
            self._attempted_at = now
            if forced:
                self._forced_at = now
            self._attempts += 1
            try:
                keys = await self._download()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("jwks %s: fetch failed (%s)", self.url, type(exc).__name__)
                if self._keys is None:
                    raise JwksUnavailable() from exc
                return self._keys
            self._keys, self._fetched_at = keys, now
            return keys

    async def _download(self) -> KeySet:
        async with self._client.stream(
            "GET", self.url, timeout=FETCH_TIMEOUT, follow_redirects=False
        ) as response:
            if response.status_code != 200:
                raise ValueError(f"status {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS too large")
        return parse_jwks(json.loads(bytes(body)), origin=self.url)
