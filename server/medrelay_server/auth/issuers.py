"""The institutions file: which OpenID Connect issuers medrelay trusts, and how.

TOML (``.toml``) or JSON (``.json``), one entry per institution::

    [[institution]]
    id = "qmh"                                   # [a-z0-9-], used in user ids ("qmh:<sub>")
    name = "Queen Mary Hospital"
    issuer = "https://login.qmh.example"         # the exact ``iss`` of its ID tokens
    audience = "medrelay"                        # the client id medrelay is registered as
    algorithms = ["RS256"]                       # asymmetric only: no HS*, no none
    jwks_url = "https://login.qmh.example/jwks"  # or jwks_file = "qmh.jwks.json", or jwks = {...}
    leeway_seconds = 60                          # clock skew accepted, at most 300
    max_age_seconds = 600                        # an ID token older than this is refused
    logout_removes = true                        # back-channel logout also removes from rooms
    # external_sender_key = "/etc/medrelay/qmh-external-sender.key"
    #   default: <data_dir>/institutions/<id>/external_sender.key (created, 0600)
    # external_sender_public = "<hex>"           # the key is held by the institution's signer

    [institution.claims]
    subject = "sub"
    name = "name"
    registration = "mchk_registration"          # MCHK number, e.g. "M15833"
    role = "role"
    doctor_roles = ["doctor"]                    # these roles need an active registration

This module only reads and validates the file; it touches no network and no key.
Everything not listed is refused, so a typo is an error at start-up, not a silent default.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ALLOWED_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
"""Asymmetric JWS algorithms an institution may use. HMAC algorithms are never allowed: they
would make the institution's verification key a shared secret, and allowing them is what
opens the HS/RS confusion attack."""

MAX_LEEWAY = 300
MAX_INSTITUTIONS = 64
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_RESERVED_IDS = frozenset({"tablet", "institution", "dev", "medrelay"})
_TOP_KEYS = frozenset(
    {
        "id",
        "name",
        "issuer",
        "audience",
        "algorithms",
        "jwks_url",
        "jwks_file",
        "jwks",
        "leeway_seconds",
        "max_age_seconds",
        "logout_removes",
        "external_sender_key",
        "external_sender_public",
        "claims",
    }
)
_CLAIM_KEYS = frozenset({"subject", "name", "registration", "role", "doctor_roles"})


class ConfigError(ValueError):
    """The institutions file is unusable; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class ClaimMap:
    subject: str = "sub"
    name: str = "name"
    registration: str = "mchk_registration"
    role: str = "role"
    doctor_roles: tuple[str, ...] = ("doctor",)


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One institution as configured. Exactly one of ``jwks_url`` and ``jwks`` is set."""

    id: str
    name: str
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    jwks_url: str | None = None
    jwks: Mapping[str, Any] | None = field(default=None, repr=False)
    claims: ClaimMap = field(default_factory=ClaimMap)
    leeway: int = 60
    max_age: int = 600
    logout_removes: bool = True
    external_sender_key: Path | None = None
    external_sender_public: bytes | None = None


def load_issuers(path: Path, *, data_dir: Path) -> list[IssuerConfig]:
    """Read and validate the institutions file. Relative paths inside it are relative to
    the file; the default external sender key path is under ``data_dir``."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            doc = tomllib.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}") from exc
    return parse_issuers(doc, base=path.parent, data_dir=data_dir, source=str(path))


def parse_issuers(
    doc: object, *, base: Path, data_dir: Path, source: str = "institutions"
) -> list[IssuerConfig]:
    if not isinstance(doc, dict) or set(doc) - {"institution", "institutions"}:
        raise ConfigError(f"{source}: expected a list under 'institution'")
    if len(doc) != 1:
        raise ConfigError(f"{source}: give 'institution' (or 'institutions') exactly once")
    entries = next(iter(doc.values()))
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_INSTITUTIONS:
        raise ConfigError(f"{source}: between 1 and {MAX_INSTITUTIONS} institutions")
    out = [_one(e, i, base=base, data_dir=data_dir, source=source) for i, e in enumerate(entries)]
    for attr in ("id", "issuer"):
        values = [getattr(c, attr) for c in out]
        dup = {v for v in values if values.count(v) > 1}
        if dup:
            raise ConfigError(f"{source}: duplicate {attr} {sorted(dup)[0]!r}")
    return out


def _one(entry: object, index: int, *, base: Path, data_dir: Path, source: str) -> IssuerConfig:
    where = f"{source}: institution #{index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(entry) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    ident = _str(entry, "id", where)
    if not _ID.fullmatch(ident) or ident in _RESERVED_IDS:
        raise ConfigError(f"{where}: id must match [a-z0-9][a-z0-9-]{{0,31}} and not be reserved")
    where = f"{source}: institution {ident!r}"
    algorithms = entry.get("algorithms", ["RS256"])
    if (
        not isinstance(algorithms, list)
        or not algorithms
        or not all(isinstance(a, str) and a in ALLOWED_ALGORITHMS for a in algorithms)
    ):
        raise ConfigError(
            f"{where}: algorithms must be a non-empty subset of the asymmetric JWS set"
        )
    jwks_url, jwks = _jwks(entry, where, base)
    leeway = _int(entry, "leeway_seconds", where, default=60, hi=MAX_LEEWAY)
    max_age = _int(entry, "max_age_seconds", where, default=600, hi=86400)
    logout_removes = entry.get("logout_removes", True)
    if not isinstance(logout_removes, bool):
        raise ConfigError(f"{where}: logout_removes must be true or false")
    key_path, public = _external_sender(entry, where, base, data_dir, ident)
    return IssuerConfig(
        id=ident,
        name=_str(entry, "name", where),
        issuer=_str(entry, "issuer", where),
        audience=_str(entry, "audience", where),
        algorithms=tuple(algorithms),
        jwks_url=jwks_url,
        jwks=jwks,
        claims=_claims(entry.get("claims", {}), where),
        leeway=leeway,
        max_age=max_age,
        logout_removes=logout_removes,
        external_sender_key=key_path,
        external_sender_public=public,
    )


def _str(entry: Mapping[str, Any], key: str, where: str, *, limit: int = 256) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ConfigError(f"{where}: {key} must be a non-empty string of at most {limit}")
    return value


def _int(entry: Mapping[str, Any], key: str, where: str, *, default: int, hi: int) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise ConfigError(f"{where}: {key} must be an integer between 0 and {hi}")
    return value


def _jwks(
    entry: Mapping[str, Any], where: str, base: Path
) -> tuple[str | None, Mapping[str, Any] | None]:
    given = [k for k in ("jwks_url", "jwks_file", "jwks") if k in entry]
    if len(given) != 1:
        raise ConfigError(f"{where}: give exactly one of jwks_url, jwks_file, jwks")
    if "jwks_url" in entry:
        url = _str(entry, "jwks_url", where, limit=2048)
        check_jwks_url(url, where)
        return url, None
    if "jwks_file" in entry:
        path = base / _str(entry, "jwks_file", where, limit=4096)
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot read JWKS file {path}") from exc
    else:
        doc = entry["jwks"]
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f"{where}: a JWKS is an object with a 'keys' list")
    return None, doc


def check_jwks_url(url: str, where: str) -> None:
    """HTTPS only, except to a loopback address (a local stand-in, tests)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _loopback(parts.hostname):
        return
    raise ConfigError(f"{where}: jwks_url must be https:// (http:// only to a loopback address)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _external_sender(
    entry: Mapping[str, Any], where: str, base: Path, data_dir: Path, ident: str
) -> tuple[Path | None, bytes | None]:
    if "external_sender_public" in entry:
        if "external_sender_key" in entry:
            raise ConfigError(f"{where}: give external_sender_key or _public, not both")
        raw = _str(entry, "external_sender_public", where)
        try:
            public = bytes.fromhex(raw)
        except ValueError:
            public = b""
        if len(public) != 32:
            raise ConfigError(f"{where}: external_sender_public must be 64 hex characters")
        return None, public
    if "external_sender_key" in entry:
        return base / _str(entry, "external_sender_key", where, limit=4096), None
    return data_dir / "institutions" / ident / "external_sender.key", None


def _claims(value: object, where: str) -> ClaimMap:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: claims must be a table")
    unknown = set(value) - _CLAIM_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown claims key {sorted(unknown)[0]!r}")
    names = {k: _str(value, k, f"{where} claims", limit=64) for k in value if k != "doctor_roles"}
    roles: Sequence[object] = value.get("doctor_roles", ["doctor"])
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise ConfigError(f"{where}: claims.doctor_roles must be a list of strings")
    return ClaimMap(**names, doctor_roles=tuple(str(r) for r in roles))
